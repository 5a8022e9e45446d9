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
                   help="rows to print per table (>= 1), shared evenly among its tasks: every task shows at least "
                        "its first row, and each cut table says how many rows it left out")


def _head(df, max_rows: int):
    """(the rows of ``df`` to print, how many were left out): at most ``max_rows`` in all, split evenly among the
    tasks in ``df`` (first rows of each, in order), and at least one row per task, so a cut table never hides a
    whole task (in the example results one task alone fills 200 rows)."""
    if len(df) <= max_rows or "task" not in df:
        return df.head(max_rows), max(len(df) - max_rows, 0)
    per_task = max(1, max_rows // max(df["task"].nunique(), 1))
    shown = df.groupby("task", sort=False, dropna=False).head(per_task)
    return shown, len(df) - len(shown)


def _cut_note(left_out: int, df, shown, what: str) -> str:
    """One line saying how many rows of one table were left out and how to see them."""
    tasks = df["task"].nunique() if "task" in df else 0
    per = f"; shown: the first {shown.groupby('task').size().min()} of each of {tasks} tasks" if tasks > 1 else ""
    return (f"({left_out} more {what} rows{per}. Raise --max-rows to {len(df)} to see them all, "
            "or narrow with --where task=NAME)")


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
    from .store import Store
    st = Store(args.store, create=False, read_only=True)
    filters = _filters(args.where)
    if args.summary:
        df = st.summary_frame(filters)
    else:
        df = st.runs_frame(filters).drop(columns=["config", "versions"] + ([] if "status" in filters else ["error"]))
    shown, left_out = _head(df, args.max_rows)
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
            shown = shown.assign(spread=["deterministic" if d else "" if s != s else f"± {s:.3g}"
                                         for d, s in zip(shown.deterministic, shown["std"])])
        else:
            cols = ["task", "metric", "strategy", "budget", "preset", "backend", "seed", "value", "stderr", "limit",
                    "status", "origin", "key"]
            shown = shown.assign(key=shown.key.str[:12])
        with pd.option_context("display.width", 240, "display.max_columns", 20, "display.max_colwidth", 60):
            print(shown[[c for c in cols if c in shown]].to_string(index=False) if len(df)
                  else "no stored results match")
        if left_out:
            print(_cut_note(left_out, df, shown, "summary" if args.summary else "result"))
        _print_paired(rec, paired, args.max_rows)
        return None
    out = {"store": str(st.path), "count": len(df), "rows": _records(shown)}
    if args.summary:   # the same per-task cut as the text tables; *_count says how many rows there are in all
        out["recovery"], out["paired"] = _records(_head(rec, args.max_rows)[0]), _records(_head(paired, args.max_rows)[0])
        out["recovery_count"], out["paired_count"] = len(rec), len(paired)
    return out


def _print_paired(rec, paired, max_rows: int) -> None:
    """The recovered fraction and the paired deltas of ``runs --summary`` as text tables."""
    import pandas as pd
    with pd.option_context("display.width", 240, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        if rec is not None and len(rec):
            print("\nrecovered fraction of the noise loss (A-X)/(A-I), mean [95% t CI over seeds]; "
                  "sampling = lm-eval stderr / |A-I|")
            r, left_out = _head(rec, max_rows)
            fmt = lambda col: ["not shown" if n else "" if v != v else f"{v:.4g}" for v, n in
                               zip(r[col], r.recovered_note)]
            r = r.assign(**{c: fmt(c) for c in ("recovered", "recovered_lo", "recovered_hi", "sampling_se_recovered")})
            print(r[["task", "metric", "preset", "strategy", "budget", "n_seeds", "recovered", "recovered_lo",
                     "recovered_hi", "sampling_se_recovered"]].to_string(index=False))
            for note, n in rec.recovered_note[rec.recovered_note != ""].value_counts().items():
                print(f"{note}: recovered fraction not shown ({n} rows)")
            if left_out:
                print(_cut_note(left_out, rec, r, "recovered-fraction"))
        if paired is not None and len(paired):
            print("\npaired deltas a - b on common seeds (metric units), mean [95% t CI]")
            p, left_out = _head(paired, max_rows)
            p = p.assign(sampling_se=["n/a" if v != v else f"{v:.4g}" for v in p.sampling_se])   # no lm-eval stderr
            print(p[["task", "metric", "preset", "budget", "a", "b", "n_seeds", "delta", "delta_lo", "delta_hi",
                     "sampling_se", "verdict"]].to_string(index=False))
            if left_out:
                print(_cut_note(left_out, paired, p, "paired-delta"))


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
