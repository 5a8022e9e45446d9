"""The results store's schema: its tables and columns, the version marker that tells a hetmoe store from any other
DuckDB file, the upgrades of older stores, and the range a stored metric value may take.

Every function here works on an open DuckDB connection that the caller holds under the store's lock
(:mod:`hetmoe_core.store_file`); :class:`hetmoe_core.store.Store` decides when to create or upgrade.
"""
from __future__ import annotations

import re

import duckdb

SCHEMA_VERSION = 3
# Columns added by schema 2, with the SQL that fills them in a version 1 store or snapshot: dtype of the model,
# where the result came from (origin: "computed" here, or "imported from <snapshot> ..."), the hash of the
# computation that produced the numbers (compute_key) and, for a result reused from an identical computation,
# the key of the run that computed it (shared_from; NULL when computed for this very key).
V2_COLUMNS = {"dtype": "json_extract_string(config, '$.model.dtype')", "origin": "'computed'",
              "compute_key": "NULL", "shared_from": "NULL"}
TABLES = ("runs", "metrics", "placements", "expert_stats", "model_shapes")
"""Tables a snapshot carries and ``Store.counts`` counts."""
TABLES_SINCE = {"model_shapes": 3}
"""Tables added after schema 1 (name -> the schema version that brought them): a store or snapshot of an older
version lacks them (``tables_of``)."""
READ_AS_IS = 2
"""The oldest schema version a reader (a store opened read-only, or on a file it cannot write) reads without
upgrading: schema 3 only added the model_shapes table, which reads of a version-2 store find absent (no stored
shapes: energy then builds them from the model's config). Schema 1 lacks columns every read needs."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    key VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, created_at TIMESTAMP, started_at TIMESTAMP,
    duration_s DOUBLE, model_source VARCHAR, model_fingerprint VARCHAR, strategy VARCHAR, budget DOUBLE,
    scope VARCHAR, preset VARCHAR, seed INTEGER, backend VARCHAR, task VARCHAR, task_version VARCHAR,
    "limit" DOUBLE, num_fewshot INTEGER, batch_size INTEGER, placement_key VARCHAR, digital_share DOUBLE,
    config VARCHAR, versions VARCHAR, error VARCHAR, dtype VARCHAR, origin VARCHAR, compute_key VARCHAR,
    shared_from VARCHAR);
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
CREATE TABLE IF NOT EXISTS model_shapes (
    model_fingerprint VARCHAR PRIMARY KEY, model_source VARCHAR, shapes VARCHAR, created_at TIMESTAMP);
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS higher_is_better BOOLEAN;
"""
TABLES_OF_SCHEMA = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
# Columns added after schema version 1 (nullable, so older stores and snapshots stay readable: NULL = not stored).
ADDED_COLUMNS = {"metrics": ("higher_is_better",)}
# Columns a caller may filter runs by (whitelist: filter names are spliced into SQL, values are parameters).
RUN_FILTERS = ("key", "status", "model_source", "model_fingerprint", "strategy", "budget", "scope", "preset",
               "seed", "backend", "task", "limit", "num_fewshot", "batch_size", "dtype", "origin")

# Valid range of a metric value by lm-eval metric name (the part before a "[filter]" suffix); anything else only
# has to be finite. Accuracies are fractions; perplexities are exp(mean NLL) >= 1; bits per byte >= 0.
METRIC_RANGES = {**{m: (0.0, 1.0) for m in ("acc", "acc_norm", "acc_mutual_info", "exact_match")},
                 **{m: (1.0, float("inf")) for m in ("perplexity", "word_perplexity", "byte_perplexity")},
                 "bits_per_byte": (0.0, float("inf"))}


def metric_problem(metric: str, value, stderr=None) -> str | None:
    """Why a stored metric value is impossible (None when it is fine): not a finite number, outside the metric's
    range (METRIC_RANGES), or a negative / non-finite stderr."""
    import math
    name = str(metric).split("[", 1)[0]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"{metric} = {value!r} is not a finite number"
    lo, hi = METRIC_RANGES.get(name, (-float("inf"), float("inf")))
    if not lo <= value <= hi:
        return f"{metric} = {value!r} is outside its range [{lo:g}, {hi:g}]"
    if stderr is not None and not (isinstance(stderr, (int, float)) and math.isfinite(stderr) and stderr >= 0):
        return f"stderr of {metric} = {stderr!r} is not a finite number >= 0"
    return None


def tables_of(version: int) -> tuple:
    """The TABLES a store or snapshot of schema ``version`` holds (those of TABLES_SINCE from their version on)."""
    return tuple(t for t in TABLES if TABLES_SINCE.get(t, 1) <= version)


def table_names(con) -> set:
    """Names of the tables in the store open on ``con`` (a version-2 store read as it is has no model_shapes)."""
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                      "WHERE table_catalog = current_database()").fetchall()}


def schema_version(con, path) -> int:
    """Schema version from the store's marker; ValueError for a DuckDB file that is not a hetmoe store of a
    version this hetmoe reads."""
    try:
        row = con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
    except duckdb.Error:
        row = None
    if row is None:
        raise ValueError(f"{path} is a DuckDB database but not a hetmoe results store (no hetmoe schema marker); "
                         "it was left untouched: give another --store path")
    if not str(row[0]).isdigit() or not 1 <= int(row[0]) <= SCHEMA_VERSION:
        raise ValueError(f"store {path} has schema version {row[0]}, this hetmoe reads 1..{SCHEMA_VERSION}: "
                         "use another --store path")
    return int(row[0])


def missing(con) -> bool:
    """True when the store open on ``con`` lacks a table or an added column of this schema (a store made by an older
    hetmoe, before a feature that brought them)."""
    have = table_names(con)
    have |= {f"{t}.{c}" for t, c in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database()").fetchall()}
    return not {*TABLES_OF_SCHEMA, *(f"{t}.{c}" for t, cs in ADDED_COLUMNS.items() for c in cs)} <= have


def create(con, path) -> None:
    """Schema and marker of a new store in one transaction (a killed creation leaves no half store); a file that
    another process made a store meanwhile is only checked (ValueError if it is not a hetmoe store)."""
    if con.execute("SELECT count(*) FROM information_schema.tables "
                   "WHERE table_catalog = current_database()").fetchone()[0]:
        schema_version(con, path)   # created meanwhile by another process: check it is ours
        return
    con.execute("BEGIN TRANSACTION")
    con.execute(SCHEMA)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('format', 'hetmoe-results')", [str(SCHEMA_VERSION)])
    con.execute("COMMIT")


def upgrade(con, path) -> None:
    """Create missing tables; schema 1 -> 2: add V2_COLUMNS to runs, filled from each run's config; 2 -> 3: the
    model_shapes table, created empty (shapes are stored as a model's results are next computed; until then
    ``energy.run_costs`` builds them from the model's config and says so). One transaction, on a store whose
    marker was checked."""
    con.execute("BEGIN TRANSACTION")
    con.execute(SCHEMA)   # 2 -> 3 is this alone (CREATE TABLE IF NOT EXISTS model_shapes)
    version = schema_version(con, path)
    if version < 2:
        for col, fill in V2_COLUMNS.items():
            con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {col} VARCHAR")
            con.execute(f"UPDATE runs SET {col} = {fill} WHERE {col} IS NULL")
    if version < SCHEMA_VERSION:
        con.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", [str(SCHEMA_VERSION)])
    con.execute("COMMIT")
