"""Commands that only read or move stored results or list what there is: ``runs``, ``export``, ``import``,
``report``, ``presets``, ``tasks``.

They import no torch, transformers, aihwkit or lm-eval (the answer is in the DuckDB store or in the noise
presets), so they start in a fraction of the time of a command that loads a model. Registered in ``cli.COMMANDS``.
"""
from __future__ import annotations

import json
import math
import os
import sys

from .cli_args import _int_at_least


def _store_arg(p):
    p.add_argument("--store", default=None, help="results store (DuckDB file; default cache/results.duckdb)")


def add_runs(p):
    _store_arg(p)
    p.add_argument("--where", action="append", default=[], metavar="COL=V[,V2]",
                   help="filter, e.g. --where strategy=maxnn --where task=paper_piqa --where status=error (repeatable)")
    p.add_argument("--summary", action="store_true", help="mean ± std over seeds instead of one row per metric, "
                   "with the recovered fraction of the noise loss and paired deltas between strategies (95%% CIs)")
    p.add_argument("--max-rows", type=_int_at_least(1), default=200,
                   help="rows to print per table (>= 1), shared evenly among its tasks; a task shows whole "
                        "configurations (every metric of each) in table order, at least one, and each cut table "
                        "says which configurations it left out")


CUT_CONFIG = {"summary": ("model_fingerprint", "config_id"), "result": ("key",),
              "recovered-fraction": ("model_fingerprint", "preset", "backend", "scope", "limit", "strategy", "budget"),
              "paired-delta": ("model_fingerprint", "preset", "backend", "scope", "limit", "budget", "a", "b")}
"""What one configuration of each `runs` table is (its rows differ only in the metric): a cut table keeps or leaves
out whole configurations, never one metric of them."""
CUT_NAMES = {"summary": ("strategy", "budget", "preset"), "result": ("strategy", "budget", "preset", "seed"),
             "recovered-fraction": ("preset", "strategy", "budget"), "paired-delta": ("preset", "budget", "a", "b")}
"""The columns a cut note names a configuration by."""
CUT_ORDER = {"summary": "strategy, budget, preset", "result": "newest first",
             "recovered-fraction": "preset, strategy, budget", "paired-delta": "preset, budget, a, b"}
"""The order each table lists a task's configurations in (the cut keeps the first ones)."""


def _configs(df, what: str):
    """One label per row: the configuration it belongs to (CUT_CONFIG; the row itself in a table without them)."""
    cols = [c for c in CUT_CONFIG[what] if c in df]
    if not cols:
        return df.index.astype(str)
    return df[cols].astype(str).agg("\x1f".join, axis=1)


def _head(df, max_rows: int, what: str = "summary"):
    """(the rows of ``df`` to print, the cut: None when every row is shown, else {"left_out": rows left out,
    "tasks": {task: (configurations shown, configurations in all, first configuration left out, its strategies
    left out)}}).

    The rule: every task keeps its place (``max_rows`` is shared evenly among the tasks), and a task shows whole
    configurations (CUT_CONFIG: every metric of each, so word_perplexity is never cut away from its
    bits_per_byte) in the order the table lists them, as many as fit in its share and at least one; what is left
    out is the rest of that order, from the configuration the note names."""
    if len(df) <= max_rows or "task" not in df:
        return (df, None) if len(df) <= max_rows else (df.head(max_rows), {"left_out": len(df) - max_rows, "tasks": {}})
    share = max(1, max_rows // max(df["task"].nunique(dropna=False), 1))
    keep, tasks = [], {}
    for task, g in df.groupby("task", sort=False, dropna=False):
        ids = _configs(g, what)
        order = list(dict.fromkeys(ids))
        sizes = ids.value_counts()
        n, rows = 0, 0
        while n < len(order) and (n == 0 or rows + sizes[order[n]] <= share):
            rows += sizes[order[n]]
            n += 1
        kept = ids.isin(order[:n])
        keep.append(kept)
        if n < len(order):
            first = g[ids == order[n]].iloc[0]
            left = g[~kept]
            who = [c for c in ("strategy", "a") if c in left]
            tasks[task] = (n, len(order), first, list(dict.fromkeys(left[who[0]])) if who else [])
    import pandas as pd
    shown = df[pd.concat(keep).reindex(df.index)]
    return shown, {"left_out": len(df) - len(shown), "tasks": tasks}


def _config_name(row, what: str) -> str:
    """A configuration as a cut note names it: "frequency, budget 1, paper-pcm-c2.5"; a pair "maxnn vs random"."""
    parts = []
    for c in CUT_NAMES[what]:
        if c in row.index and c != "b":
            v = row[c]
            parts.append(f"budget {v:g}" if c == "budget" else f"seed {v}" if c == "seed" else
                         f"{v} vs {row['b']}" if c == "a" and "b" in row.index else f"{v}")
    return ", ".join(parts)


def _cut_note(cut: dict, df, what: str) -> str:
    """What a cut table left out and how to see it, in one paragraph: the rows, the rule, and per task (tasks
    alike in the cut are named together) how many configurations it shows and the first one left out."""
    if not cut["tasks"]:
        return f"({cut['left_out']} more {what} rows. Raise --max-rows to {len(df)} to see them all)"
    metrics = (f"every metric of each ({', '.join(sorted(df['metric'].dropna().unique()))})" if "metric" in df
               else "every row of each")
    by_text: dict = {}
    for task, (n, total, first, names) in cut["tasks"].items():
        text = (f"the first {n} of {total} configurations shown, every one from {_config_name(first, what)} on "
                "left out" + (f" (of strategies {', '.join(map(str, names))})" if names and what != "paired-delta"
                              else ""))
        by_text.setdefault(text, []).append(str(task))
    per = "; ".join(f"{tasks[0] if len(tasks) == 1 else f'{len(tasks)} tasks ({tasks[0]} … {tasks[-1]})'}: {t}"
                    for t, tasks in by_text.items())
    return (f"({cut['left_out']} more {what} rows left out. Each task keeps its share of --max-rows in whole "
            f"configurations, {metrics}, in table order ({CUT_ORDER[what]}): {per}. Raise --max-rows to {len(df)} "
            "to see them all, or narrow with --where task=NAME or --where strategy=NAME)")


def _filters(where: list[str]) -> dict:
    out = {}
    for w in where:
        if "=" not in w:
            raise ValueError(f"--where {w!r} must look like column=value")
        k, v = (x.strip() for x in w.split("=", 1))
        vals = []
        for x in v.split(","):
            try:
                vals.append(float(x) if k in ("budget", "limit") else int(x) if k in ("seed", "batch_size", "num_fewshot") else x)
            except ValueError:
                raise ValueError(f"--where {k}: {x!r} is not a number") from None
        out[k] = vals
    return out


def _records(df) -> list[dict]:
    """Rows as JSON-able dicts with full float precision (pandas' to_json rounds to 10 digits)."""
    import pandas as pd

    def plain(v):
        if isinstance(v, (list, tuple)) or hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
            v = v.tolist() if hasattr(v, "tolist") else list(v)
            return [plain(x) for x in v] if isinstance(v, list) else v
        if isinstance(v, pd.Timestamp):
            return v.isoformat()
        if isinstance(v, float) and v != v:
            return None
        return None if v is pd.NaT or v is None or (not isinstance(v, (str, list)) and pd.isna(v)) else v
    return [{k: plain(v) for k, v in r.items()} for r in df.to_dict("records")]


SUMMARY_VARIANTS = ("num_fewshot", "scope", "analog_dense", "overrides", "model_source", "model_fingerprint")
"""Columns of store.summary_frame that `runs --summary` prints only where the shown rows differ in them."""


def cmd_runs(args) -> dict:
    from .results import number   # the dashboard's formatter: n/a for missing, float rounding as 0
    from .store import Store
    st = Store(args.store, create=False, read_only=True)
    filters = _filters(args.where)
    if args.summary:
        df = st.summary_frame(filters)
    else:
        df = st.runs_frame(filters).drop(columns=["config", "versions"] + ([] if "status" in filters else ["error"]))
    what = "summary" if args.summary else "result"
    shown, cut = _head(df, args.max_rows, what)
    rec = paired = None
    if args.summary:   # paired statistics on the same seeds (hetmoe_core.paired)
        from .paired import paired_deltas, recovery_table
        runs = st.runs_frame(filters)
        rec, paired = recovery_table(runs), paired_deltas(runs)
    if not args.json:
        import pandas as pd
        if args.summary:
            # every config column that tells two shown rows apart: left out, two sweeps' ideal results (another
            # limit or num_fewshot) printed as the same line twice
            varies = [c for c in SUMMARY_VARIANTS if c in shown and shown[c].astype(str).nunique() > 1]
            cols = ["task", "metric", "strategy", "budget", "preset", "backend", "batch_size", "dtype", "limit",
                    *varies, "mean", "spread", "n_seeds", "origins"]
            shown = shown.assign(limit=shown["limit"].map(lambda v: "all" if v != v or v is None else int(v)))
            shown = shown.assign(spread=["deterministic" if d else "" if s != s else f"± {number(s, '.3g', m)}"
                                         for d, s, m in zip(shown.deterministic, shown["std"], shown["mean"])],
                                 mean=shown["mean"].map(number))
        else:
            cols = ["task", "metric", "strategy", "budget", "preset", "backend", "seed", "value", "stderr", "limit",
                    "status", "origin", "key"]
            shown = shown.assign(key=shown.key.str[:12], value=shown["value"].map(number),
                                 stderr=shown["stderr"].map(number))
        with pd.option_context("display.width", 240, "display.max_columns", 20, "display.max_colwidth", 60):
            print(shown[[c for c in cols if c in shown]].to_string(index=False) if len(df)
                  else "no stored results match")
        if cut:
            print(_cut_note(cut, df, what))
        _print_paired(rec, paired, args.max_rows)
        return None
    out = {"store": str(st.path), "count": len(df), "rows": _records(shown),
           "left_out": _cut_note(cut, df, what) if cut else None}
    if args.summary:   # the same cut as the text tables; *_count says how many rows there are in all
        (r, rc), (p, pc) = _head(rec, args.max_rows, "recovered-fraction"), _head(paired, args.max_rows, "paired-delta")
        out["recovery"], out["paired"] = _records(r), _records(p)
        out["recovery_count"], out["paired_count"] = len(rec), len(paired)
        out["recovery_left_out"] = _cut_note(rc, rec, "recovered-fraction") if rc else None
        out["paired_left_out"] = _cut_note(pc, paired, "paired-delta") if pc else None
    return out


def _print_paired(rec, paired, max_rows: int) -> None:
    """The recovered fraction and the paired deltas of ``runs --summary`` as text tables (numbers through
    results.number, as the dashboard shows them)."""
    import pandas as pd
    from .results import number, seeds_label
    with pd.option_context("display.width", 240, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        if rec is not None and len(rec):
            print("\nrecovered fraction of the noise loss (A-X)/(A-I), mean [95% t CI over seeds]; "
                  "sampling = lm-eval stderr / |A-I|")
            r, cut = _head(rec, max_rows, "recovered-fraction")
            fmt = lambda col: ["not shown" if n else number(v) for v, n in zip(r[col], r.recovered_note)]
            r = r.assign(**{c: fmt(c) for c in ("recovered", "recovered_lo", "recovered_hi", "sampling_se_recovered")},
                         seeds=[seeds_label(n, c) for n, c in zip(r.n_seeds, r.n_computations)])
            print(r[["task", "metric", "preset", "strategy", "budget", "seeds", "recovered", "recovered_lo",
                     "recovered_hi", "sampling_se_recovered"]].to_string(index=False))
            for note, n in rec.recovered_note[rec.recovered_note != ""].value_counts().items():
                print(f"{note}: recovered fraction not shown ({n} rows)")
            if (rec.n_computations < rec.n_seeds).any():
                print("deterministic presets: their seeds are copies of one computation, so the noise loss is judged "
                      "by lm-eval's stderr (resolved only beyond 1.96 x stderr of A), not by an interval over copies")
            if cut:
                print(_cut_note(cut, rec, "recovered-fraction"))
        if paired is not None and len(paired):
            print("\npaired deltas a - b on common seeds (metric units), mean [95% t CI]")
            p, cut = _head(paired, max_rows, "paired-delta")
            p = p.assign(**{c: p[c].map(number) for c in ("delta", "delta_lo", "delta_hi", "sampling_se",
                                                                "sampling_lo", "sampling_hi")})
            p = p.assign(seeds=[seeds_label(n, c) for n, c in zip(p.n_seeds, p.n_computations)])
            print(p[["task", "metric", "preset", "budget", "a", "b", "seeds", "delta", "delta_lo", "delta_hi",
                     "sampling_se", "sampling_lo", "sampling_hi", "verdict"]].to_string(index=False))
            if (p.basis == "sampling error").any():
                print("sampling_lo/hi: deterministic preset, one computation shared by its seeds (no seed spread): "
                      "delta ± 1.96 x sqrt(se_a^2 + se_b^2) of lm-eval's sampling error decides the verdict")
            if cut:
                print(_cut_note(cut, paired, "paired-delta"))


def add_export(p):
    _store_arg(p)
    p.add_argument("out", help="snapshot file to write (.zip); never overwritten without --force")
    p.add_argument("--keys", default=None, help="comma-separated run keys (default: all matching --where)")
    p.add_argument("--where", action="append", default=[], metavar="COL=V[,V2]", help="filter as in `runs`")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists (never the store itself)")


def cmd_export(args) -> dict:
    from .snapshot import export_snapshot
    from .store import Store
    keys = [k for k in args.keys.split(",") if k] if args.keys else None
    man = export_snapshot(Store(args.store, create=False, read_only=True), args.out, keys=keys,
                          filters=_filters(args.where), overwrite=args.force)
    return {"path": args.out, **man}


def add_import(p):
    _store_arg(p)
    p.add_argument("snapshot", help="snapshot file (.zip) written by `export`")


def cmd_import(args) -> dict:
    from .snapshot import import_snapshot, read_snapshot
    from .store import Store
    read_snapshot(args.snapshot)   # validate before the store file is even created
    return import_snapshot(args.snapshot, Store(args.store))


def add_report(p):
    p.add_argument("source", help="snapshot (.zip) or store (.duckdb) to report")
    p.add_argument("--out", default="report.html", help="HTML file to write; never overwritten without --force")
    p.add_argument("--title", default="hetmoe results")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists (never the source itself)")


def cmd_report(args) -> dict:
    from .report import write_report
    return write_report(args.source, args.out, title=args.title, overwrite=args.force)


# ---- presets: every noise parameter with its unit, source and allowed range (noise.NoiseConfig field metadata)
def add_presets(p):
    p.add_argument("name", nargs="?", default=None, help="a preset (default: list them all)")


def _allowed(d: dict) -> str:
    a = d.get("allowed")
    if a is None:
        return ""
    text = ", ".join(a) if isinstance(a[0], str) else "true | false" if isinstance(a[0], bool) else f"[{a[0]:g}, {a[1]:g}]"
    return text + (f" or None ({d['optional']})" if d.get("optional") else "")


def cmd_presets(args) -> dict:
    from .noise import PRESET_DOCS, PRESETS, field_docs, get_preset
    docs = field_docs()
    names = [args.name] if args.name else list(PRESETS)
    presets = {n: get_preset(n) for n in names}   # ValueError names the choices for an unknown preset
    out = {n: {"doc": PRESET_DOCS[n], "parameters": {
        f: {"value": v, "unit": docs[f]["unit"], "allowed": _allowed(docs[f]), "source": docs[f]["source"],
            "help": docs[f]["help"], "default": docs[f]["default"]}
        for f, v in p.to_dict().items() if f != "name"}} for n, p in presets.items()}
    if args.json:
        return out
    for n, d in out.items():
        print(f"{n}: {d['doc']}")
        if args.name:
            for f, x in d["parameters"].items():
                print(f"  {f:<19} {str(x['value']):<10} {x['unit']:<26} allowed {x['allowed']:<28} {x['source']}")
                print(f"  {'':<19} {x['help']}")
        else:
            changed = {f: x["value"] for f, x in d["parameters"].items() if x["value"] != x["default"]}
            print("  " + (", ".join(f"{f}={v}" for f, v in changed.items()) or "all defaults"))
    if not args.name:
        print("`presets NAME` prints every parameter with its unit, allowed range and source; "
              "`evaluate --set NAME=VALUE` overrides one.")
    return None


def add_tasks(p):
    pass   # no options: lists hetmoe's tasks by alias


def cmd_tasks(args) -> dict:
    """hetmoe's own tasks by alias (``tasks.task_aliases``: the default model's "local", its "ppl" subset, the
    paper's offline "paper" suite); any lm-eval task name works too (``lm-eval ls tasks`` lists them)."""
    from .tasks import task_aliases
    out = task_aliases()
    if args.json:
        return out
    for alias, names in out.items():
        print(f"{alias}: {', '.join(names) or '(none)'}")
    print("Any lm-eval task name works too: `lm-eval ls tasks` lists them.")
    return None
