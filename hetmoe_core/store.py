"""DuckDB results store: runs, metrics, expert statistics and placements, with honest caching.

Concurrency: see :mod:`hetmoe_core.store_file` (every connection opens there, under the store's locks).
Schema, version marker, upgrades and metric ranges: :mod:`hetmoe_core.store_schema`.

Safety: a store is recognised by its schema marker (``meta.schema_version``); an existing file without it (another
program's DuckDB database) is refused before anything is written, so its bytes stay identical. Stores opened with
``read_only=True`` (listing, export, report) only ever open DuckDB with ``read_only=True`` and work on files and
folders the user cannot write; a write to a store that is not writable raises one clear ValueError.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from . import store_schema as schema
from .outputs import atomic_write, output_path  # noqa: F401  (re-export: snapshot and report write through them)
from .store_file import _READY, StoreBusy, StoreFile, _file_id  # noqa: F401  (re-export)
from .store_schema import (ADDED_COLUMNS, METRIC_RANGES, RUN_FILTERS, SCHEMA_VERSION, TABLES,  # noqa: F401  (re-export)
                           V2_COLUMNS, metric_problem)

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "cache" / "results.duckdb"


def shown_path(path: str | os.PathLike) -> str:
    """How a store or snapshot file is named to users: its path relative to the app's folder when inside it, else
    its file name only. A server (a classroom may share one) never shows its absolute paths in the UI or a report."""
    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(DEFAULT_PATH.parent.parent).as_posix()
    except ValueError:
        return p.name


def canonical_json(obj) -> str:
    """Canonical JSON (sorted keys, no spaces, floats by repr) used for every hash in the store."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def config_key(config: dict) -> str:
    """Cache key of a run config: sha256 hex of its canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _now():
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store(StoreFile):
    """Results store at ``path`` (default ``cache/results.duckdb``); creates the file and schema if missing.

    read_only: never write (every DuckDB connection is ``read_only=True``; a write raises ValueError); for
    commands that only read, so a store on a read-only file or folder still lists, exports and reports.
    Raises ValueError if the path is a folder, if the file is not a DuckDB database or has no hetmoe schema marker
    (refused before any write), has another schema version, or is missing and ``create`` is False (or read_only);
    StoreBusy if it stays locked for more than ``timeout`` s.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0, create: bool = True,
                 read_only: bool = False):
        super().__init__(Path(path or os.environ.get("HETMOE_STORE") or DEFAULT_PATH).expanduser().resolve(), timeout,
                         read_only)
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; give a .duckdb file path as the store")
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if not exists and (read_only or not create):
            raise ValueError(f"no results store at {self.path}; run `evaluate`/`sweep` or `import` first")
        if exists and _file_id(self.path) in _READY:
            return   # marker and schema already checked by this process for this very file
        if exists:
            try:
                with self._connect(write=False) as con:
                    version = schema.schema_version(con, self.path)
                    incomplete = schema.missing(con)
            except StoreBusy:   # another process writes it: a file this process checked before opens unchecked
                if not any(f[-1] == str(self.path) for f in _READY):   # (each read then says it is busy, or
                    raise                                            # a page shows its last answer)
                return
            if version < schema.READ_AS_IS and (read_only or not self.writable):
                raise ValueError(f"store {self.path} has schema version {version}; open it once where it is "
                                 f"writable (e.g. `import` or `evaluate` with --store) to upgrade it to "
                                 f"{SCHEMA_VERSION}")
            pending = version < SCHEMA_VERSION or incomplete
            if pending and self.writable:
                with self._connect(write=True) as con:   # tables added since the store was made are created too
                    schema.upgrade(con, self.path)
                pending = False
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect(write=True) as con:
                schema.create(con, self.path)
            pending = False
        if not pending:   # an older store read as it is stays unchecked: a later writer of this process upgrades it
            _READY.add(_file_id(self.path))

    def query(self, sql: str, params=()):
        """Run one read-only query; returns a pandas DataFrame."""
        with self._connect(write=False) as con:
            return con.execute(sql, list(params)).df()

    def get_result(self, key: str) -> dict | None:
        """The stored successful result for cache key ``key`` as {"run": {...}, "metrics": [...]}, or None."""
        with self._connect(write=False) as con:
            cur = con.execute("SELECT * FROM runs WHERE key=? AND status='ok'", [key])
            row = cur.fetchone()
            if row is None:
                return None
            run = dict(zip([d[0] for d in cur.description], row))
            cur = con.execute("SELECT task, metric, value, stderr, seed, higher_is_better FROM metrics WHERE key=? "
                              "ORDER BY task, metric", [key])
            metrics = [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]
        return {"run": run, "metrics": metrics}

    def get_results(self, keys) -> dict[str, dict]:
        """Stored successful results for several keys in one short read: {key: {"run": ..., "metrics": [...]}}."""
        return self.lookup(keys)[0]

    def lookup(self, keys, model_fingerprint: str | None = None) -> tuple[dict[str, dict], set[str]]:
        """(:meth:`get_results` of ``keys``, :meth:`computed_keys` of the model or an empty set when
        ``model_fingerprint`` is None) in one short read, as a sweep starts (a connection costs ~15 ms, measured)."""
        keys = list(keys)
        if not keys and model_fingerprint is None:
            return {}, set()
        with self._connect(write=False) as con:
            cur = con.execute("SELECT * FROM runs WHERE status='ok' AND list_contains(?, key)", [keys])
            cols = [d[0] for d in cur.description]
            out = {r[0]: {"run": dict(zip(cols, r)), "metrics": []} for r in cur.fetchall()}
            # the metrics of the results found (none for a sweep of new results: no second scan, ~1.5 ms, measured)
            rows = con.execute("SELECT key, task, metric, value, stderr, seed, higher_is_better FROM metrics "
                               "WHERE list_contains(?, key) ORDER BY key, task, metric", [list(out)]).fetchall() \
                if out else []
            computed = set() if model_fingerprint is None else _computed_keys(con, model_fingerprint)
        for k, task, metric, value, stderr, seed, hib in rows:
            if k in out:
                out[k]["metrics"].append({"task": task, "metric": metric, "value": value, "stderr": stderr,
                                          "seed": seed, "higher_is_better": hib})
        return out, computed

    def existing_keys(self, keys) -> set[str]:
        """The subset of ``keys`` that already have a successful stored result."""
        keys = list(keys)
        if not keys:
            return set()
        with self._connect(write=False) as con:
            rows = con.execute("SELECT key FROM runs WHERE status='ok' AND list_contains(?, key)", [keys]).fetchall()
        return {r[0] for r in rows}

    def put_result(self, key: str, run: dict, metrics: list[dict], placement: dict | None = None) -> bool:
        """Store one whole result (run row + its metrics + its placement) in one transaction.

        run: column -> value (see RUN_FILTERS and the runs table); metrics: [{task, metric, value, stderr, seed}].
        Append-only: returns False (and changes nothing) if an ok result for ``key`` already exists;
        a previous failed row for ``key`` is replaced.
        """
        return self.put_results([(key, run, metrics, placement)])[0]

    def put_results(self, items) -> list[bool]:
        """:meth:`put_result` of several results ``[(key, run, metrics, placement or None)]`` in one transaction
        with one INSERT per table (a connection costs ~10 ms on this machine and a DuckDB statement ~2 ms, more
        than a small result's forward); a sweep writes what it computed every few seconds this way. Returns, per
        item, False where an ok result was already stored (or came earlier in ``items``)."""
        items = list(items)
        if not items:
            return []
        out, runs, metrics, placements = [], [], [], {}
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                rows = con.execute("SELECT key, status FROM runs WHERE list_contains(?, key)",
                                   [[k for k, *_ in items]]).fetchall()
                have = {k for k, status in rows if status == "ok"}
                failed = {k for k, status in rows if status != "ok"}
                for key, run, ms, placement in items:
                    out.append(key not in have)
                    if key in have:
                        continue
                    have.add(key)
                    now = _now()
                    runs.append({"origin": "computed", **run, "key": key, "status": "ok", "created_at": now})
                    metrics += [{"key": key, **m} for m in ms]
                    if placement is not None and placement["key"] not in placements:   # one row per placement
                        placements[placement["key"]] = {**placement, "created_at": now}
                if failed & have:   # a failed row is replaced
                    con.execute("DELETE FROM runs WHERE list_contains(?, key)", [sorted(failed & have)])
                if runs:   # metrics left without their run (a failed run's, an older schema's) are replaced too
                    con.execute("DELETE FROM metrics WHERE list_contains(?, key)", [[r["key"] for r in runs]])
                _insert(con, "runs", runs)
                _insert(con, "metrics", metrics)
                _insert(con, "placements", list(placements.values()), ignore=True)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return out

    @contextlib.contextmanager
    def _append_once(self, exists_sql: str, params: list):
        """One write transaction for an append-only table: yields the connection, or None (and changes nothing)
        when ``exists_sql`` finds a row; commits when the body ends, rolls back when it raises."""
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                fresh = con.execute(exists_sql, params).fetchone() is None
                yield con if fresh else None
                con.execute("COMMIT" if fresh else "ROLLBACK")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def computed_keys(self, model_fingerprint: str) -> set[str]:
        """Compute keys of the successful results computed (not shared) for one model: a sweep reads them once and
        looks up only the computations it finds here (:meth:`get_computed_many`)."""
        with self._connect(write=False) as con:
            return _computed_keys(con, model_fingerprint)

    def get_computed_many(self, compute_keys) -> dict[str, tuple[str, list[dict]]]:
        """{compute_key: (key, metrics)} of the successful results computed (not themselves shared) for those of
        ``compute_keys`` the store holds, the earliest per computation: identical work (same weights, analog set,
        noise, task, ...) is then reused, not redone. One short read for a unit's tasks (a connection costs ~10 ms,
        measured)."""
        compute_keys = list(dict.fromkeys(compute_keys))
        if not compute_keys:
            return {}
        with self._connect(write=False) as con:
            rows = con.execute("SELECT compute_key, arg_min(key, created_at) FROM runs WHERE status='ok' AND "
                               "shared_from IS NULL AND list_contains(?, compute_key) GROUP BY compute_key",
                               [compute_keys]).fetchall()
            keys = {k: c for c, k in rows}
            got = con.execute("SELECT key, task, metric, value, stderr FROM metrics WHERE list_contains(?, key) "
                              "ORDER BY key, task, metric", [list(keys)]).fetchall() if keys else []
        out = {c: (k, []) for k, c in keys.items()}
        for k, task, metric, value, stderr in got:
            out[keys[k]][1].append({"task": task, "metric": metric, "value": value, "stderr": stderr})
        return out

    def put_failure(self, key: str, run: dict, error: str) -> None:
        """Record a failed run (never a cache hit; a later successful run replaces it)."""
        run = {"origin": "computed", **run, "key": key, "status": "error", "error": error[:2000], "created_at": _now()}
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            if con.execute("SELECT 1 FROM runs WHERE key=?", [key]).fetchone():
                con.execute("ROLLBACK")
                return
            _insert(con, "runs", run)
            con.execute("COMMIT")

    def runs_frame(self, filters: dict | None = None, status: str | None = "ok"):
        """Runs × metrics as a long pandas DataFrame: one row per (run, metric), newest first.

        filters: {column: value or list of values}, columns from RUN_FILTERS; ValueError on an unknown column.
        status: only runs of this status ("ok" by default, None for all); a "status" filter replaces it.
        """
        return self.query(*_runs_sql(filters, status))

    def summary_frame(self, filters: dict | None = None):
        """Mean ± std over seeds of successful results whose configuration is identical but for the seed.

        Seeds are grouped by the full stored config minus the seed (model, dtype, task and version, limit,
        few-shot, batch size, placement request with its dense policy, every noise parameter, backend, library
        versions), so results differing in anything else never average together.
        Columns: model_source, model_fingerprint, strategy, budget, scope, preset (the label: the preset name plus
        the fields that differ from it, e.g. ``paper-pcm-c1.5 (adc_bits=4)``), preset_name, overrides, dtype,
        batch_size, num_fewshot, analog_dense (dense kinds placed on AIMC, "" = the paper's all digital), backend,
        task, limit, metric, mean, std (sample std, NaN for one seed), n_seeds, deterministic (the noise has no
        random part: every seed gives the same numbers), digital_share, seeds (list), origins (where the results
        came from), shared (how many reused an identical computation), config_id (12 hex digits of the group),
        higher_is_better (lm-eval's direction as stored with the metric; None for results stored before it was).
        """
        from .summary import summarize_runs
        return summarize_runs(self.runs_frame(filters))

    def delete_runs(self, keys) -> int:
        """Delete runs (and their metrics) by key; returns the number of runs deleted."""
        keys = list(keys)
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            n = con.execute("SELECT count(*) FROM runs WHERE list_contains(?, key)", [keys]).fetchone()[0]
            con.execute("DELETE FROM metrics WHERE list_contains(?, key)", [keys])
            con.execute("DELETE FROM runs WHERE list_contains(?, key)", [keys])
            con.execute("COMMIT")
        return n

    # -- expert statistics and placements --------------------------------------------------------------------
    def put_expert_stats(self, model_fingerprint: str, name: str, stats: dict) -> None:
        """Store JSON-able expert statistics (e.g. activation frequency per layer) for one model fingerprint."""
        with self._connect(write=True) as con:
            con.execute("INSERT OR REPLACE INTO expert_stats VALUES (?, ?, ?, ?)",
                        [model_fingerprint, name, canonical_json(stats), _now()])

    def get_expert_stats(self, model_fingerprint: str, name: str) -> dict | None:
        """Stored expert statistics or None."""
        with self._connect(write=False) as con:
            row = con.execute("SELECT stats FROM expert_stats WHERE model_fingerprint=? AND name=?",
                              [model_fingerprint, name]).fetchone()
        return None if row is None else json.loads(row[0])

    # -- measured sensitivity (hetmoe_core.sensitivity) --------------------------------------------------------
    def put_sensitivity(self, key: str, model_fingerprint: str, preset: str, config: dict, result: dict) -> bool:
        """Store one sensitivity measurement (its full config and JSON result) in one transaction.
        Append-only: returns False and changes nothing if ``key`` is already stored."""
        with self._append_once("SELECT 1 FROM sensitivity WHERE key=?", [key]) as con:
            if con is None:
                return False
            _insert(con, "sensitivity", {"key": key, "model_fingerprint": model_fingerprint, "preset": preset,
                                         "config": canonical_json(config),
                                         "versions": canonical_json(config.get("versions", {})),
                                         "result": canonical_json(result), "created_at": _now()})
        return True

    def get_sensitivity(self, key: str) -> dict | None:
        """The stored sensitivity result (JSON dict) for ``key``, or None."""
        with self._connect(write=False) as con:
            row = con.execute("SELECT result FROM sensitivity WHERE key=?", [key]).fetchone()
        return None if row is None else json.loads(row[0])

    def sensitivity_frame(self):
        """Stored sensitivity measurements (key, model_fingerprint, preset, config, created_at), newest first."""
        return self.query("SELECT key, model_fingerprint, preset, config, created_at FROM sensitivity "
                          "ORDER BY created_at DESC")

    def placements_frame(self, keys=None):
        """Stored placements (one row each, ``placement`` is the Placement JSON) as a pandas DataFrame."""
        if keys is None:
            return self.query("SELECT * FROM placements ORDER BY created_at")
        return self.query("SELECT * FROM placements WHERE list_contains(?, key) ORDER BY created_at", [list(keys)])

    # -- model shapes (energy.ModelShapes): what a cost needs, stored so that costing never builds the model ----
    def put_model_shapes(self, model_fingerprint: str, model_source: str, shapes: dict) -> bool:
        """Store the JSON-able shapes (``energy.ModelShapes.to_dict``) of one model fingerprint. Append-only: returns
        False and changes nothing when that fingerprint's shapes are stored (the same weights have the same
        shapes)."""
        with self._append_once("SELECT 1 FROM model_shapes WHERE model_fingerprint=?", [model_fingerprint]) as con:
            if con is None:
                return False
            _insert(con, "model_shapes", {"model_fingerprint": model_fingerprint, "model_source": model_source,
                                          "shapes": canonical_json(shapes), "created_at": _now()})
        return True

    def get_model_shapes(self, model_fingerprint: str) -> dict | None:
        """The stored shapes (JSON dict) of one model fingerprint; None when none are stored, also in a store of
        schema 2 read as it is (no model_shapes table: ``store_schema.READ_AS_IS``)."""
        with self._connect(write=False) as con:
            if "model_shapes" not in schema.table_names(con):
                return None
            row = con.execute("SELECT shapes FROM model_shapes WHERE model_fingerprint=?",
                              [model_fingerprint]).fetchone()
        return None if row is None else json.loads(row[0])

    def counts(self) -> dict:
        """Row count per table (0 for a table a store of an older schema, read as it is, does not hold)."""
        with self._connect(write=False) as con:
            have = schema.table_names(con)
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] if t in have else 0 for t in TABLES}

    def signature(self) -> str:
        """Changes whenever results are added or removed: the run count and the newest run's time (a cache key for
        anything built from the whole store, e.g. a downloadable snapshot)."""
        with self._connect(write=False) as con:
            n, newest = con.execute("SELECT count(*), max(created_at) FROM runs").fetchone()
        return f"{n}|{newest}"

    @contextlib.contextmanager
    def write_transaction(self):
        """A connection inside one exclusive transaction (used by snapshot import); rolls back on error."""
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read_connection(self):
        """A read-only connection held for one short block (used by snapshot export)."""
        with self._connect(write=False) as con:
            yield con


def _computed_keys(con, model_fingerprint: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT DISTINCT compute_key FROM runs WHERE model_fingerprint=? AND status='ok' "
                                      "AND shared_from IS NULL AND compute_key IS NOT NULL",
                                      [model_fingerprint]).fetchall()}


def _insert(con, table: str, rows: dict | list[dict], ignore: bool = False, chunk: int = 256) -> None:
    """Insert a row or ``rows`` (column -> value), one set of columns at a time (a column a row does not name gets
    its default): as one Arrow table (``INSERT ... BY NAME``) when every column holds one Python type
    (:func:`_arrow_table`), else with one multi-row INSERT per ``chunk`` rows. DuckDB prepares each statement
    afresh (~2 ms), so one statement per row would cost more than the forward passes of a small sweep's results;
    binding each value as a parameter still took ~20 ms for a sweep's 24 runs of ~40 columns, the Arrow table
    ~5 ms (measured, ``bench/bench_overhead.py``). ``ignore``: INSERT OR IGNORE (rows whose primary key is stored
    are skipped)."""
    groups: dict = {}
    for r in [rows] if isinstance(rows, dict) else rows:
        groups.setdefault(tuple(r), []).append(r)
    verb = "INSERT OR IGNORE" if ignore else "INSERT"
    for cols, grp in groups.items():
        tbl = _arrow_table(cols, grp)
        if tbl is not None:
            con.register("hetmoe_rows", tbl)
            try:
                con.execute(f"{verb} INTO {table} BY NAME SELECT * FROM hetmoe_rows")
            finally:
                con.unregister("hetmoe_rows")
            continue
        names, marks = ", ".join(f'"{c}"' for c in cols), f"({', '.join('?' * len(cols))})"
        for i in range(0, len(grp), chunk):
            part = grp[i:i + chunk]
            con.execute(f"{verb} INTO {table} ({names}) VALUES {', '.join([marks] * len(part))}",
                        [r[c] for r in part for c in cols])


_ARROW_TYPES = {str: "string", bool: "bool_", int: "int64", float: "float64"}


def _arrow_table(cols: tuple, rows: list[dict]):
    """``rows`` as a pyarrow Table of the columns ``cols``, or None unless each column's values (None aside) are all
    of one of str, bool, int (64-bit), float or naive datetime: then each value reaches DuckDB as the same SQL
    value a bound parameter of its type gives, and is cast to the column's type alike (a column mixing types
    could be cast otherwise: it takes the parameter path)."""
    import datetime as dt
    import pyarrow as pa
    arrays = []
    for c in cols:
        vals = [r[c] for r in rows]
        kinds = {type(v) for v in vals if v is not None}
        if len(kinds) > 1:
            return None
        kind = kinds.pop() if kinds else None
        if kind is None:
            typ = pa.null()
        elif kind is dt.datetime and all(v is None or v.tzinfo is None for v in vals):
            typ = pa.timestamp("us")
        elif kind in _ARROW_TYPES and not (kind is int and any(v is not None and not -2 ** 63 <= v < 2 ** 63
                                                                 for v in vals)):
            typ = getattr(pa, _ARROW_TYPES[kind])()
        else:
            return None
        arrays.append(pa.array(vals, type=typ))
    return pa.Table.from_arrays(arrays, names=list(cols))


def _runs_sql(filters: dict | None, status: str | None) -> tuple[str, list]:
    where, params = _where(filters, status)
    return (f"SELECT r.*, m.metric, m.value, m.stderr, m.higher_is_better FROM runs r "
            f"LEFT JOIN metrics m ON m.key = r.key {where} ORDER BY r.created_at DESC, r.key, m.metric"), params


def _where(filters: dict | None, status: str | None):
    clauses, params = [], []
    if status is not None and "status" not in (filters or {}):
        clauses.append("r.status = ?")
        params.append(status)
    for col, val in (filters or {}).items():
        if col not in RUN_FILTERS:
            raise ValueError(f"unknown filter {col!r}; choose from {', '.join(RUN_FILTERS)}")
        if val is None:
            continue
        vals = list(val) if isinstance(val, (list, tuple, set)) else [val]
        clauses.append(f'r."{col}" IN ({", ".join("?" * len(vals))})')
        params.extend(vals)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
