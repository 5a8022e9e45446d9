"""Results as the dashboard shows them: rows of an evaluation in progress, a stored result in the same shape, the
Results page's filters (limit, kept selections) and its reference values.

Pure functions over evaluate_many's result dicts and store.Store frames; no Streamlit here.
"""
from __future__ import annotations

import math

import pandas as pd

ALL = "all"
"""The Limit filter's value for results computed on every document of a task (stored limit NULL)."""


def result_rows(results: list[dict]) -> pd.DataFrame:
    """One row per result of ``evaluate.evaluate_many`` (or ``stored_result``): task, strategy (its chart label,
    strategy_label), budget % (percent of routed experts digital), preset, seed, one column per metric, and whether
    the store answered it."""
    rows = [{"task": r["task"], "strategy": strategy_label(r["strategy"]), "budget %": r["budget"] * 100,
             "preset": r["preset"],
             "seed": r["seed"], **r["metrics"], "cached": "✓ cached" if r["cached"] else "computed"}
            for r in results]
    return pd.DataFrame(rows)


def stored_result(store, key: str) -> dict:
    """The stored result ``key`` in evaluate_many's result shape ({"task", "strategy", "budget", "preset", "seed",
    "metrics": {name: value}, "cached": True}). Raises KeyError when the store has no such result."""
    got = store.get_result(key)
    if got is None:
        raise KeyError(key)
    run = got["run"]
    return {"task": run["task"], "strategy": run["strategy"], "budget": run["budget"], "preset": run["preset"],
            "seed": run["seed"], "metrics": {m["metric"]: m["value"] for m in got["metrics"]}, "cached": True}


def higher_is_better(metric: str, rows: pd.DataFrame) -> bool:
    """Direction of ``metric`` as lm-eval declared it, stored with each metric (``higher_is_better`` column of
    store.summary_frame); results stored before that column ask lm-eval's registry (tasks.higher_is_better).
    Unknown either way: True (accuracy-like), the more common case."""
    stored = rows["higher_is_better"].dropna() if "higher_is_better" in rows else []
    if len(stored):
        return bool(stored.iloc[0])
    from .tasks import higher_is_better as registry
    known = registry(metric)
    return True if known is None else bool(known)


def limit_choices(summary: pd.DataFrame) -> list:
    """Limits (documents per task) present in a summary frame, ascending, then ``ALL`` if some results used every
    document. Results with different limits are not comparable, so the page shows one limit at a time."""
    lims = summary["limit"]
    vals = sorted({int(v) for v in lims.dropna().tolist()})
    return vals + ([ALL] if lims.isna().any() else [])


def latest(store, model_fingerprint: str | None = None, task: str | None = None) -> dict | None:
    """Model fingerprint, task and limit (``ALL`` for every document) of the newest successful result in ``store``
    (runs.created_at), of one model and task when given, so the Results page opens on the limit run last, not on
    the largest one; None when nothing matches."""
    where, args = ["status = 'ok'"], []
    for col, v in (("model_fingerprint", model_fingerprint), ("task", task)):
        if v is not None:
            where.append(f"{col} = ?")
            args.append(v)
    df = store.query('SELECT model_fingerprint, task, "limit" FROM runs WHERE ' + " AND ".join(where)
                     + " ORDER BY created_at DESC NULLS LAST LIMIT 1", args)
    if df.empty:
        return None
    r = df.iloc[0]
    lim = r["limit"]
    return {"model_fingerprint": r.model_fingerprint, "task": r.task,
            "limit": ALL if lim is None or (isinstance(lim, float) and math.isnan(lim)) else int(lim)}


def session_run(job) -> dict:
    """Model fingerprint, task and limit (``ALL`` for every document) of this session's last evaluation: ``job`` is
    the Evaluate page's ``jobs.Job`` (or None); the task is that of its newest result. {} when there is no job or it
    has no result yet."""
    if job is None or not job.results:
        return {}
    return {"model_fingerprint": getattr(getattr(job.handle, "lm", None), "fingerprint", None),
            "task": job.results[-1]["task"], "limit": job.kwargs.get("limit") or ALL}


def opening_task(rows: pd.DataFrame, model: str, last_run: dict) -> str:
    """The task the Results page opens on among ``rows`` (the summary rows of ``model``, not empty): the task of
    this session's last evaluation (``last_run``, from :func:`session_run`) when it is of this model and has rows
    here, else the task with the most rows (not the first by name: one stray result of another task must not hide
    the others)."""
    tasks = set(rows.task)
    if last_run.get("model_fingerprint") == model and last_run.get("task") in tasks:
        return last_run["task"]
    return rows.groupby("task").size().idxmax()


def opening_limit(store, limits: list, model: str, task: str, last_run: dict) -> int:
    """Index into ``limits`` (:func:`limit_choices`) of the limit the Results page opens on for ``model`` and
    ``task``: the limit of this session's last evaluation when it ran this model and task, else that of the newest
    stored result of them (:func:`latest`: the limit run last, not the largest one, whose results an earlier CLI
    run may have left), else the last choice. Reads ``store`` (a ``store.Store``) only when the session's run does
    not decide; while another process writes it (StoreBusy), opens on the last choice."""
    from .store_file import StoreBusy
    if last_run.get("model_fingerprint") == model and last_run.get("task") == task:
        last = last_run
    else:
        try:
            last = latest(store, model, task) or {}
        except StoreBusy:
            last = {}
    return limits.index(last["limit"]) if last.get("limit") in limits else len(limits) - 1


def paired_runs(runs: pd.DataFrame, metric: str, limit, presets, strategies, backends) -> pd.DataFrame:
    """The runs the Results page's paired statistics use: ``runs`` (a runs_frame of one model and task) of ``metric``
    at ``limit`` (:func:`at_limit`), the ideal ones and those of the chosen presets, strategies and backends. Runs
    are labelled as the summary labels them (``summary.label_runs``), so an edited preset ("paper-pcm-c1.5
    (adc_bits=6)") matches its filter chip and is never paired with the unedited preset's runs."""
    from .summary import label_runs
    runs = at_limit(label_runs(runs[runs.metric == metric]), limit)
    return runs[(runs.strategy == "ideal") | (runs.preset.isin(presets) & runs.strategy.isin(strategies)
                                              & runs.backend.isin(backends))]


def at_limit(summary: pd.DataFrame, limit) -> pd.DataFrame:
    """Rows of ``summary`` computed with ``limit`` documents per task (``ALL``: every document)."""
    if limit == ALL:
        return summary[summary["limit"].isna()]
    return summary[summary["limit"] == limit]


def limit_label(limit) -> str:
    """A limit in words: "20 documents per task", or "all documents" for ``ALL`` / a missing (NULL, NaN) limit,
    which means every document of the task was scored."""
    if limit is None or limit == ALL or (isinstance(limit, float) and math.isnan(limit)):
        return "all documents"
    n = int(limit)
    return f"{n} document{'' if n == 1 else 's'} per task"


def chart_groups(summary: pd.DataFrame) -> list[tuple[str, str, object, pd.DataFrame]]:
    """[(task, metric, limit, rows)]: one chart's worth of a summary frame per (task, metric, limit), sorted; limit
    is an int or ``ALL``. Results with different limits are scored on different documents, so they never share a
    chart, and each chart's ideal (all-digital) reference comes from its own rows."""
    out = []
    for (task, metric), g in summary.groupby(["task", "metric"], sort=True):
        out += [(task, metric, lim, at_limit(g, lim)) for lim in limit_choices(g)]
    return out


def keep_selection(chosen, options: list) -> tuple[list, list]:
    """A filter's selection after its options changed (e.g. another limit): (kept, dropped).

    kept: the chosen values still among ``options``, in option order — or every option when ``chosen`` is None (a
    filter never set) or when none of the chosen values exists any more (the view would be empty for a reason the
    user did not pick); dropped: chosen values that are not options now (the page names them)."""
    if chosen is None:
        return list(options), []
    chosen = list(chosen)
    kept = [o for o in options if o in chosen]
    dropped = [c for c in chosen if c not in options]
    if not kept and dropped:
        return list(options), dropped
    return kept, dropped


def references(rows: pd.DataFrame, shown: pd.DataFrame) -> tuple[float | None, dict]:
    """(ideal, all_analog) of one task, metric and limit: the all-digital noise-free result (None if not run) and
    {preset: mean over the shown strategies at budget 0} (every routed expert analog)."""
    ideal = rows[rows.strategy == "ideal"]["mean"]
    value = float(ideal.iloc[0]) if len(ideal) else None
    analog = {p: float(g["mean"].mean()) for p, g in shown[shown.budget == 0].groupby("preset")}
    return (value if value is None or math.isfinite(value) else None), analog


TABLE_COLUMNS = ["strategy", "budget %", "preset", "backend", "scope", "mean", "std", "n_seeds", "digital_share",
                 "seeds", "limit", "model_source"]


def summary_table(rows: pd.DataFrame, shown: pd.DataFrame) -> pd.DataFrame:
    """The Results table: the ideal result (budget 100 %) then the shown noisy rows, budget in percent."""
    table = shown.assign(**{"budget %": shown.budget * 100}).drop(columns=["budget"])
    ideal = rows[rows.strategy == "ideal"].assign(**{"budget %": 100.0}).drop(columns=["budget"])
    table = pd.concat([ideal, table], ignore_index=True)
    return table[[c for c in TABLE_COLUMNS if c in table]]


_TABLE_WORDS = {"runs": ("result", "results"), "metrics": ("metric value", "metric values"),
                "placements": ("placement", "placements"), "expert_stats": ("expert statistics table",
                                                                        "expert statistics tables"),
                "sensitivity": ("measured sensitivity", "measured sensitivities"),
                "model_shapes": ("model's shapes", "models' shapes")}


def _count(n: int, table: str) -> str:
    one, many = _TABLE_WORDS.get(table, (table, table))
    return f"{n} {one if n == 1 else many}"


def import_message(outcome: dict) -> str:
    """snapshot.import_snapshot's outcome ({"added": {table: n}, "snapshot_rows": {table: n}}) in words, e.g.
    "Imported 2 results, 4 metric values and 2 placements; 1 result was already in the store."."""
    added, rows = outcome.get("added", {}), outcome.get("snapshot_rows", {})
    new = [_count(n, t) for t, n in added.items() if n]
    have = [_count(rows.get(t, 0) - n, t) for t, n in added.items() if rows.get(t, 0) - n > 0]
    if not new:
        return "Nothing new: everything in this snapshot was already in the store."
    text = "Imported " + _join(new)
    if have:
        text += f"; {_join(have)} {'was' if len(have) == 1 and have[0].startswith('1 ') else 'were'} already in " \
                "the store"
    return text + "."


def snapshot_contents(tables: dict) -> str:
    """A snapshot's tables ({table: pyarrow.Table}) as words: "3 results, 6 metric values, 3 placements"."""
    return _join([_count(t.num_rows, name) for name, t in tables.items()])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


NA = "n/a"
ROUNDING = 1e-9
"""Relative size below which a number is float rounding, shown as 0: sums and differences over seeds in float64
leave ~1e-16 of their operands (e.g. the spread of five equal results, 4.97e-16); no metric, damage or interval
this workbench reports resolves anything near 1e-9 of its scale."""


def number(v, spec: str = ".4g", scale=None) -> str:
    """One number as the dashboard and the CLI print it (the one formatter both use): ``format(v, spec)``; a missing
    value (None, NaN, pandas NA) reads NA ("n/a"), never "None", "nan" or "NaN"; float rounding reads 0 at the shown
    precision: |v| below ROUNDING x max(1, |scale|) is 0 (``scale``: the magnitude ``v`` is a spread or difference
    of, e.g. the mean for a std), and a zero never carries a minus sign. -1.056e-14 gives "0"."""
    if v is None or isinstance(v, str):
        return NA if v is None else v
    try:
        x = float(v)
    except (TypeError, ValueError):
        return NA if pd.isna(v) else str(v)
    if x != x:
        return NA
    ref = abs(float(scale)) if scale is not None and scale == scale else 1.0
    if abs(x) < ROUNDING * max(ref, 1.0):
        x = 0.0
    text = format(x, spec)
    if text.startswith("-") and not any(c in "123456789" for c in text.split("e")[0]):
        text = text[1:]     # "-0.0000": a negative number that rounds to zero at this precision
    return text


def text_widths(frame: pd.DataFrame, columns, px_per_char: float = 7.6, padding: int = 30, most: int = 420) -> dict:
    """{column: width in px} that shows the longest text of each of ``columns`` in ``frame`` (header included)
    whole in a Streamlit table (~7.6 px per character of its 14 px font, plus cell padding and the sort icon),
    at most ``most`` px; columns missing from ``frame`` are left out. Streamlit's auto-sizing of a table whose
    columns are pinned cut "MaxNNScore" to "MaxNNSc" and "paper-pcm-c1.5" to "paper-pc"."""
    out = {}
    for c in columns:
        if c in frame:
            longest = max([len(str(c)), *(len(str(v)) for v in frame[c])])
            out[c] = int(min(most, round(longest * px_per_char + padding)))
    return out


def as_text(frame: pd.DataFrame, formats: dict) -> pd.DataFrame:
    """``frame`` with the columns of ``formats`` ({column: format spec, e.g. ".4g"}) as text (``number``): a missing
    value reads NA — a table cell never shows the word "None" or "nan" where a number has no meaning."""
    return frame.assign(**{c: [number(v, f) for v in frame[c]] for c, f in formats.items() if c in frame})


def strategy_label(name) -> str:
    """A strategy as people read it: the registry's label (strategies.criterion_labels, the one the charts use),
    the name itself for "ideal" and names outside the registry."""
    from .strategies import criterion_labels
    return criterion_labels().get(name, name)


def percent(fraction) -> str:
    """A digital budget (fraction of routed experts) as the charts write it: 0.125 -> "12.5%"."""
    return NA if fraction is None or fraction != fraction else f"{fraction * 100:g}%"


def _verdict(text: str) -> str:
    """paired_deltas' verdict with the strategy's label: "maxnn better" -> "MaxNNScore better"."""
    return f"{strategy_label(text[:-7])} better" if text.endswith(" better") else text


def seeds_label(n_seeds, n_computations=None) -> str:
    """How many independent results stand behind a statistic: the seed count, or for seeds that are copies of
    one deterministic computation (paired.recovery_table / paired_deltas' n_computations < n_seeds) the number of
    computations, e.g. "1 computation (deterministic preset; 3 seeds share it)"."""
    n = int(n_seeds)
    c = n if n_computations is None or n_computations != n_computations else int(n_computations)
    if c >= n:
        return str(n)
    share = "it" if c == 1 else "them"
    return f"{c} computation{'' if c == 1 else 's'} (deterministic preset; {n} seeds share {share})"


PAIRED_HELP = {
    "strategy A": "Placement strategy A, by its label as on the charts. Downloads (CSV/Parquet) and the CLI's "
                  "`runs --summary --json` keep the machine name (maxnn, frequency, …) in column a.",
    "strategy B": "Placement strategy B, compared with A on their common seeds. Downloads keep the machine name "
                  "in column b.",
    "digital budget": "Share of routed experts kept digital. Downloads keep it as a fraction (0.125 = 12.5%).",
    "seeds": "Noise seeds both strategies were run with (the same programming noise for both: paired). A "
             "deterministic preset (no per-seed randomness) computes once and its seeds are copies: the number "
             "of distinct computations is shown instead.",
    "A − B": "Mean over the common seeds of A's result minus B's, in the metric's units.",
    "95% interval": "Student-t interval of A − B over the seeds (scipy.stats.t); n/a with one seed.",
    "A − B recovered": "Difference of the recovered fractions of the noise loss (A−X)/(A−I), fraction units.",
    "sampling SE": "lm-eval's standard error of one result over the task's documents (metric units), for scale.",
    "sampling interval": "Deterministic preset (one computation) only: A − B ± 1.96 × √(SE_A² + SE_B²), "
                         "lm-eval's sampling error over the documents — the only uncertainty left, and what the "
                         "verdict uses.",
    "verdict": "“no difference” when the 95% interval (over seeds; for a deterministic preset the sampling "
               "interval) covers 0; otherwise the better strategy by the metric's direction.",
}
"""Help of each column of paired_view's table (the Results page's column tooltips, the report's header titles)."""


def paired_view(deltas: pd.DataFrame, metric: str | None = None, context: bool = False
                ) -> tuple[pd.DataFrame, list[str]]:
    """The paired-differences table (paired.paired_deltas rows) as people read it, and the footnotes of its n/a
    cells. Strategies by their chart labels, budgets in %, verdicts with labels, numbers to 4 significant digits;
    a missing value reads NA ("n/a"), never blank, "None" or "nan", and a note says why: no lm-eval stderr for the
    metric; a recovered fraction of a noise loss inside the noise (paired.noise_loss); one seed, no interval; a
    deterministic preset's seeds that are copies of one computation (seeds_label; judged by the sampling interval).
    ``context``: lead with task, metric and limit (the report's table spans tasks); ``metric`` names the metric
    in the notes (default: the metrics of the rows without a stderr). Column help: PAIRED_HELP."""
    num = number
    n_comp = deltas["n_computations"] if "n_computations" in deltas else deltas["n_seeds"]
    samp = [NA if lo != lo else f"[{number(lo)}, {number(hi)}]"
            for lo, hi in zip(deltas.get("sampling_lo", pd.Series(math.nan, index=deltas.index)),
                              deltas.get("sampling_hi", pd.Series(math.nan, index=deltas.index)))]
    cols = {"preset": deltas["preset"], "digital budget": deltas["budget"].map(percent),
            "strategy A": deltas["a"].map(strategy_label), "strategy B": deltas["b"].map(strategy_label),
            "seeds": [seeds_label(n, c) for n, c in zip(deltas["n_seeds"], n_comp)],
            "A − B": deltas["delta"].map(num),
            "95% interval": [NA if lo != lo else f"[{number(lo)}, {number(hi)}]"
                             for lo, hi in zip(deltas["delta_lo"], deltas["delta_hi"])],
            "A − B recovered": deltas["delta_recovered"].map(num), "sampling SE": deltas["sampling_se"].map(num),
            "sampling interval": samp, "verdict": deltas["verdict"].map(_verdict)}
    if context:
        cols = {"task": deltas["task"], "metric": deltas["metric"], "limit": deltas["limit"].map(limit_label),
                **cols}
    view = pd.DataFrame(cols, index=deltas.index).reset_index(drop=True)
    notes = []
    no_se = deltas[deltas["sampling_se"].isna()]
    if len(no_se):
        names = metric or ", ".join(sorted(no_se["metric"].unique()))
        notes.append(f"sampling SE {NA}: lm-eval reports no standard error for {names} here (its perplexity "
                     "tasks report none for word_perplexity, byte_perplexity or bits_per_byte; accuracies have one).")
    if deltas["delta_recovered"].isna().any():
        notes.append(f"A − B recovered {NA}: the noise loss (all routed experts analog − ideal) is inside the noise "
                     "for that preset, so the recovered fraction is not defined.")
    one = deltas["delta_lo"].isna()
    copies = one & (n_comp < deltas["n_seeds"])
    if copies.any():
        notes.append(f"95% interval {NA} for a deterministic preset: its seeds are copies of one computation, so "
                     "there is no seed spread (a zero-width interval over copies is not evidence); the verdict "
                     "uses lm-eval's sampling error instead (sampling interval), and a difference inside it is "
                     "“no difference”.")
    if (one & ~copies).any():
        notes.append(f"95% interval {NA}: one seed, no spread to build an interval from; run two or more seeds.")
    if any(x == NA for x in samp):
        notes.append(f"sampling interval {NA}: only a deterministic preset's single computation is judged by "
                     "lm-eval's sampling error; with seeds the 95% interval over them decides.")
    return view, notes


def summary_view(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """summary_table's rows with mean, std and digital share as text (NA where missing) and why std is NA: one
    result (the ideal all-digital result is deterministic and stored once) has no spread over seeds."""
    view = as_text(table, {"mean": ".4f", "std": ".4f", "digital_share": ".3f"})
    if "strategy" in view:
        view = view.assign(strategy=view["strategy"].map(strategy_label))   # as the charts name it
    notes = [f"std {NA}: a single result — no spread over seeds (the ideal all-digital result is deterministic, "
             "stored once)."] if table["std"].isna().any() else []
    return view, notes


DRIFT_COLUMNS = {"layer": "MoE layer", "changed_share": "tokens with a changed top-k set",
                 "changed_share_se": "± SE over seeds", "load_max_over_mean_ideal": "max/mean load, ideal",
                 "load_max_over_mean_noisy": "max/mean load, noisy"}


def drift_view(rows: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Routing-drift rows (sensitivity.drift_rows) as the pages show them: shares in percent, load ratios with two
    decimals, a missing standard error as "n/a" (never "None") and a note saying why (one seed: no spread)."""
    df = pd.DataFrame(rows, columns=list(DRIFT_COLUMNS))
    pct = lambda x: NA if x is None or x != x else number(100 * x, ".1f") + "%"  # noqa: E731
    out = pd.DataFrame({
        DRIFT_COLUMNS["layer"]: [f"L{int(x)}" for x in df.layer],
        DRIFT_COLUMNS["changed_share"]: [pct(x) for x in df.changed_share],
        DRIFT_COLUMNS["changed_share_se"]: [pct(x) for x in df.changed_share_se],
        DRIFT_COLUMNS["load_max_over_mean_ideal"]: [number(x, ".2f") for x in df.load_max_over_mean_ideal],
        DRIFT_COLUMNS["load_max_over_mean_noisy"]: [number(x, ".2f") for x in df.load_max_over_mean_noisy]})
    notes = (["± SE n/a: one noise seed gives no spread over seeds."]
             if df.changed_share_se.isna().any() else [])
    return out, notes
