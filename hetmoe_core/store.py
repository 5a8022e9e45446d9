"""DuckDB results store: runs, metrics, expert statistics and placements, with honest caching.

Concurrency design (DuckDB lets one read-write process lock out every other process, readers included):
  * no connection lives longer than one operation: open, run one query or one transaction, close;
  * every operation first takes an advisory ``fcntl.flock`` on a sidecar file ``<db>.lock``: shared for reads,
    exclusive for writes, so DuckDB's own lock is never contended by hetmoe processes or threads (each
    operation opens its own file descriptor, so threads of one process exclude each other like processes do);
    a second lock ``<db>.lock-gate`` gives writers preference, so polling readers can never starve a sweep;
  * a DuckDB lock error from a foreign process (e.g. the duckdb CLI) is retried with backoff until ``timeout`` s;
  * results are append-only: one transaction writes a run and all its metrics, so ``kill -9`` leaves whole
    results only (DuckDB's WAL drops the uncommitted transaction on the next open).
Connections are never shared between threads; every public method is safe to call from any thread.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb

SCHEMA_VERSION = 1
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "cache" / "results.duckdb"
TABLES = ("runs", "metrics", "placements", "expert_stats")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    key VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, created_at TIMESTAMP, started_at TIMESTAMP,
    duration_s DOUBLE, model_source VARCHAR, model_fingerprint VARCHAR, strategy VARCHAR, budget DOUBLE,
    scope VARCHAR, preset VARCHAR, seed INTEGER, backend VARCHAR, task VARCHAR, task_version VARCHAR,
    "limit" DOUBLE, num_fewshot INTEGER, batch_size INTEGER, placement_key VARCHAR, digital_share DOUBLE,
    config VARCHAR, versions VARCHAR, error VARCHAR);
CREATE TABLE IF NOT EXISTS metrics (
    key VARCHAR, task VARCHAR, metric VARCHAR, value DOUBLE, stderr DOUBLE, seed INTEGER,
    PRIMARY KEY (key, task, metric));
CREATE TABLE IF NOT EXISTS placements (
    key VARCHAR PRIMARY KEY, model_fingerprint VARCHAR, strategy VARCHAR, budget DOUBLE, scope VARCHAR,
    seed INTEGER, placement VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS expert_stats (
    model_fingerprint VARCHAR, name VARCHAR, stats VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (model_fingerprint, name));
CREATE TABLE IF NOT EXISTS sensitivity (
    key VARCHAR PRIMARY KEY, model_fingerprint VARCHAR, preset VARCHAR, config VARCHAR, versions VARCHAR,
    result VARCHAR, created_at TIMESTAMP);
"""
# Columns a caller may filter runs by (whitelist: filter names are spliced into SQL, values are parameters).
RUN_FILTERS = ("key", "status", "model_source", "model_fingerprint", "strategy", "budget", "scope", "preset",
               "seed", "backend", "task", "limit", "num_fewshot", "batch_size")


_READY: set = set()   # (device, inode, mtime, size, path) of store files whose schema this process checked


def _file_id(path: Path) -> tuple:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, str(path))


class StoreBusy(RuntimeError):
    """Raised when the store stays locked by another process for longer than the timeout."""


def canonical_json(obj) -> str:
    """Canonical JSON (sorted keys, no spaces, floats by repr) used for every hash in the store."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def config_key(config: dict) -> str:
    """Cache key of a run config: sha256 hex of its canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _now():
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """Results store at ``path`` (default ``cache/results.duckdb``); creates the file and schema if missing.

    Raises ValueError if the file is not a hetmoe store of this schema version (or is missing and ``create`` is
    False), StoreBusy if it stays locked for more than ``timeout`` s.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0, create: bool = True):
        self.path = Path(path or os.environ.get("HETMOE_STORE") or DEFAULT_PATH).expanduser().resolve()
        self.timeout = timeout
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; give a .duckdb file path as the store")
        if not create and not self.path.is_file():
            raise ValueError(f"no results store at {self.path}; run `evaluate`/`sweep` or `import` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = str(self.path) + ".lock"
        if self.path.is_file() and _file_id(self.path) in _READY:
            return   # schema already checked by this process for this very file
        with self._connect(write=True) as con:   # write open also replays a WAL left by a killed writer
            con.execute(_SCHEMA)
            row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            elif int(row[0]) != SCHEMA_VERSION:
                raise ValueError(f"store {self.path} has schema version {row[0]}, this hetmoe needs "
                                 f"{SCHEMA_VERSION}: use another --store path")
        _READY.add(_file_id(self.path))

    # -- connection handling -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, write: bool):
        deadline = time.monotonic() + self.timeout
        gate = os.open(self._lockfile + "-gate", os.O_RDWR | os.O_CREAT, 0o666)
        fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            # Writer preference: a writer holds the gate exclusively while it waits for the readers inside to
            # leave, so a stream of short reads (dashboards polling) can never starve the sweep's writes.
            self._flock(gate, fcntl.LOCK_EX if write else fcntl.LOCK_SH, deadline)
            try:
                self._flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH, deadline)
            finally:
                if not write:
                    fcntl.flock(gate, fcntl.LOCK_UN)
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=not write)
                    break
                except duckdb.IOException as e:   # lock held by a process outside this protocol
                    if "lock" not in str(e).lower():
                        raise ValueError(f"{self.path} is not a readable DuckDB store ({str(e).splitlines()[0]}); "
                                         "use another --store path") from None
                    if time.monotonic() > deadline:
                        raise StoreBusy(f"store {self.path} is locked by another program: {e}") from None
                    time.sleep(0.02 + random.random() * 0.05)
                except duckdb.Error as e:
                    raise ValueError(f"{self.path} is not a readable DuckDB store ({e}); use another --store path") from None
            try:
                yield con
            finally:
                con.close()
        finally:
            os.close(fd)   # closing releases the flocks
            os.close(gate)

    def _flock(self, fd: int, mode: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(f"store {self.path} busy for {self.timeout:.0f} s; retry later") from None
                time.sleep(0.002 + random.random() * 0.01)

    def query(self, sql: str, params=()):
        """Run one read-only query; returns a pandas DataFrame."""
        with self._connect(write=False) as con:
            return con.execute(sql, list(params)).df()

    # -- runs ----------------------------------------------------------------------------------------------
    def get_result(self, key: str) -> dict | None:
        """The stored successful result for cache key ``key`` as {"run": {...}, "metrics": [...]}, or None."""
        with self._connect(write=False) as con:
            cur = con.execute("SELECT * FROM runs WHERE key=? AND status='ok'", [key])
            row = cur.fetchone()
            if row is None:
                return None
            run = dict(zip([d[0] for d in cur.description], row))
            cur = con.execute("SELECT task, metric, value, stderr, seed FROM metrics WHERE key=? ORDER BY task, metric", [key])
            metrics = [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]
        return {"run": run, "metrics": metrics}

    def get_results(self, keys) -> dict[str, dict]:
        """Stored successful results for several keys in one short read: {key: {"run": ..., "metrics": [...]}}."""
        keys = list(keys)
        if not keys:
            return {}
        with self._connect(write=False) as con:
            cur = con.execute("SELECT * FROM runs WHERE status='ok' AND list_contains(?, key)", [keys])
            cols = [d[0] for d in cur.description]
            out = {r[0]: {"run": dict(zip(cols, r)), "metrics": []} for r in cur.fetchall()}
            rows = con.execute("SELECT key, task, metric, value, stderr, seed FROM metrics "
                               "WHERE list_contains(?, key) ORDER BY key, task, metric", [keys]).fetchall()
        for k, task, metric, value, stderr, seed in rows:
            if k in out:
                out[k]["metrics"].append({"task": task, "metric": metric, "value": value, "stderr": stderr, "seed": seed})
        return out

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
        run = {**run, "key": key, "status": "ok", "created_at": _now()}
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                if con.execute("SELECT 1 FROM runs WHERE key=? AND status='ok'", [key]).fetchone():
                    con.execute("ROLLBACK")
                    return False
                con.execute("DELETE FROM runs WHERE key=?", [key])
                con.execute("DELETE FROM metrics WHERE key=?", [key])
                _insert(con, "runs", run)
                for m in metrics:
                    _insert(con, "metrics", {"key": key, **m})
                if placement is not None:
                    _insert(con, "placements", {**placement, "created_at": _now()}, ignore=True)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return True

    def put_failure(self, key: str, run: dict, error: str) -> None:
        """Record a failed run (never a cache hit; a later successful run replaces it)."""
        run = {**run, "key": key, "status": "error", "error": error[:2000], "created_at": _now()}
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            if con.execute("SELECT 1 FROM runs WHERE key=?", [key]).fetchone():
                con.execute("ROLLBACK")
                return
            _insert(con, "runs", run)
            con.execute("COMMIT")

    def runs_frame(self, filters: dict | None = None, status: str = "ok"):
        """Runs × metrics as a long pandas DataFrame: one row per (run, metric), newest first.

        filters: {column: value or list of values}, columns from RUN_FILTERS; ValueError on an unknown column.
        """
        where, params = _where(filters, status)
        sql = (f"SELECT r.*, m.metric, m.value, m.stderr FROM runs r LEFT JOIN metrics m ON m.key = r.key "
               f"{where} ORDER BY r.created_at DESC, r.key, m.metric")
        return self.query(sql, params)

    def summary_frame(self, filters: dict | None = None):
        """Mean ± std over seeds per (model, strategy, budget, scope, preset, backend, task, limit, metric).

        Columns: model_source, model_fingerprint, strategy, budget, scope, preset, backend, task, limit, metric,
        mean, std (sample std, NaN for one seed), n_seeds, digital_share, seeds (list).
        """
        where, params = _where(filters, "ok")
        sql = f"""SELECT r.model_source, r.model_fingerprint, r.strategy, r.budget, r.scope, r.preset, r.backend,
                   r.task, r."limit", m.metric, avg(m.value) AS mean, stddev_samp(m.value) AS std,
                   count(*) AS n_seeds, avg(r.digital_share) AS digital_share, list(r.seed ORDER BY r.seed) AS seeds
                 FROM runs r JOIN metrics m ON m.key = r.key {where}
                 GROUP BY ALL ORDER BY r.task, m.metric, r.strategy, r.budget, r.preset"""
        return self.query(sql, params)

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
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                if con.execute("SELECT 1 FROM sensitivity WHERE key=?", [key]).fetchone():
                    con.execute("ROLLBACK")
                    return False
                _insert(con, "sensitivity", {"key": key, "model_fingerprint": model_fingerprint, "preset": preset,
                                             "config": canonical_json(config),
                                             "versions": canonical_json(config.get("versions", {})),
                                             "result": canonical_json(result), "created_at": _now()})
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
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

    def counts(self) -> dict:
        """Row count per table."""
        with self._connect(write=False) as con:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}

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


def _insert(con, table: str, row: dict, ignore: bool = False) -> None:
    cols = list(row)
    names = ", ".join(f'"{c}"' for c in cols)
    verb = "INSERT OR IGNORE" if ignore else "INSERT"
    con.execute(f"{verb} INTO {table} ({names}) VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])


def _where(filters: dict | None, status: str | None):
    clauses, params = [], []
    if status is not None:
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
