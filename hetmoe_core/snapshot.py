"""Portable snapshots of stored results: one zip of Parquet tables plus a manifest (no pickle anywhere).

Layout: ``manifest.json`` ({"format": "hetmoe-snapshot", "schema_version", "created_at", "hetmoe_version",
"tables": {name: {"file", "sha256", "rows", "bytes"}}}) and ``<table>.parquet`` for runs, metrics, placements,
expert_stats and model_shapes (the shapes energy costs need, ``energy.ModelShapes``: since schema 3; a snapshot of
schema 1 or 2 has no such member and imports without it). Import never writes archive members to disk: every
member is checked (name, declared size, compression ratio, sha256, columns) and read into memory with a bounded
read, then merged into the store in one transaction (idempotent: rows whose primary key exists are kept as they
are). Any failure leaves the store untouched.
Imported metric values are checked against their range (store_schema.metric_problem) and every imported run records its
origin ("imported from <file> (exported <time>)"); snapshots of schema 1 get the schema-2 columns filled on import.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

from .store import Store, _where, atomic_write, canonical_json, output_path
from .store_schema import ADDED_COLUMNS, SCHEMA_VERSION, TABLES, V2_COLUMNS, metric_problem, table_names, tables_of

FORMAT = "hetmoe-snapshot"
MAX_FILE_BYTES = 512 << 20          # snapshot file on disk
MAX_MEMBER_BYTES = 512 << 20       # declared uncompressed size of one member
MAX_TOTAL_BYTES = 1 << 30          # declared uncompressed size of all members
MAX_RATIO = 100                    # declared uncompressed / compressed size (zip bombs reach 1000+)
ALLOWED = ("manifest.json",) + tuple(f"{t}.parquet" for t in TABLES)


class SnapshotError(ValueError):
    """A file that is not a valid snapshot of this schema version (the message says why)."""


# Parquet goes through Arrow's own in-memory buffers, single-threaded, never through a Python file object: Arrow's
# thread pools reading a Python file object call back into Python from native threads, and a read that fails
# (a damaged member) could leave such a worker alive into interpreter shutdown, which then aborts with
# "terminate called without an active exception" (apache/arrow#34314, #50482). Snapshot tables are small.
def _parquet(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _read_parquet(blob: bytes):
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pq.read_table(pa.BufferReader(blob), use_threads=False, pre_buffer=False)


def export_snapshot(store: Store, path: str | os.PathLike, keys=None, filters: dict | None = None,
                    overwrite: bool = False) -> dict:
    """Write the chosen successful runs (by cache ``keys`` and/or runs_frame ``filters``; all when neither) with
    their metrics, placements and their models' expert statistics and shapes to the zip ``path`` (written
    atomically).

    Returns the manifest. Raises ValueError when nothing matches, for an unknown filter, when ``path`` is a
    folder, exists and ``overwrite`` is False, or is the store itself (see store.output_path).
    """
    from . import __version__
    path = output_path(path, overwrite, protect=[store.path])
    where, params = _where(filters, "ok")
    if keys is not None:
        keys = list(keys)
        where += (" AND " if where else "WHERE ") + "list_contains(?, r.key)"
        params.append(keys)
    sel = f"SELECT r.key FROM runs r {where}"
    queries = {
        "runs": f"SELECT * FROM runs WHERE key IN ({sel}) ORDER BY key",
        "metrics": f"SELECT * FROM metrics WHERE key IN ({sel}) ORDER BY key, task, metric",
        "placements": f"SELECT * FROM placements WHERE key IN (SELECT placement_key FROM runs WHERE key IN ({sel})) ORDER BY key",
        "expert_stats": f"SELECT * FROM expert_stats WHERE model_fingerprint IN "
                        f"(SELECT model_fingerprint FROM runs WHERE key IN ({sel})) ORDER BY model_fingerprint, name",
        "model_shapes": f"SELECT * FROM model_shapes WHERE model_fingerprint IN "
                        f"(SELECT model_fingerprint FROM runs WHERE key IN ({sel})) ORDER BY model_fingerprint",
    }
    with store.read_connection() as con:
        have = table_names(con)   # a schema-2 store read as it is has no model_shapes: exported empty
        tables = {t: con.sql(q, params=params).to_arrow_table() if t in have else _empty(t)
                  for t, q in queries.items()}
        measured = con.sql(f"SELECT model_fingerprint, key, config, result, created_at FROM sensitivity WHERE "
                           f"model_fingerprint IN (SELECT model_fingerprint FROM runs WHERE key IN ({sel})) "
                           "ORDER BY created_at", params=params).fetchall()
    tables["expert_stats"] = _with_measurements(tables["expert_stats"], measured)
    if tables["runs"].num_rows == 0:
        raise ValueError("no stored results match; check the keys/filters with `runs`")
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "hetmoe_version": __version__,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tables": {}}
    blobs = {}
    for t, tab in tables.items():
        blob = _parquet(tab)
        blobs[f"{t}.parquet"] = blob
        manifest["tables"][t] = {"file": f"{t}.parquet", "sha256": hashlib.sha256(blob).hexdigest(),
                                 "rows": tab.num_rows, "bytes": len(blob)}
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=True))   # Parquet is compressed
        for name, blob in blobs.items():
            z.writestr(name, blob)
    return manifest


def _empty(table: str):
    """An empty pyarrow table with the columns and types of the store's ``table`` (from this schema)."""
    import duckdb
    from .store_schema import SCHEMA
    with duckdb.connect() as con:
        con.execute(SCHEMA)
        return con.sql(f"SELECT * FROM {table}").to_arrow_table()


def _read(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with z.open(info) as f:
            data = f.read(info.file_size + 1)   # bounded: never more than the (checked) declared size + 1
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise SnapshotError(f"member {info.filename} is damaged or encrypted: {e}") from None
    if len(data) != info.file_size:
        raise SnapshotError(f"member {info.filename} holds more or less data than declared")
    return data


def read_snapshot(path: str | os.PathLike) -> tuple[dict, dict]:
    """Validate a snapshot and return (manifest, {table: pyarrow.Table}) without touching any store; the tables are
    those of the snapshot's schema version (``store_schema.tables_of``: no model_shapes before schema 3).

    Raises SnapshotError (a ValueError) for: a missing, oversized or non-zip file; a member whose name escapes the
    archive (absolute, '..', backslash, drive) or is unexpected; declared sizes over the limits or a compression
    ratio typical of zip bombs; a wrong format or schema version; a checksum mismatch; unreadable Parquet; stored
    model shapes that do not read as ``energy.ModelShapes``.
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"no snapshot file at {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise SnapshotError(f"{path} is {path.stat().st_size} bytes, over the {MAX_FILE_BYTES} byte snapshot limit")
    if not zipfile.is_zipfile(path):
        raise SnapshotError(f"{path} is not a hetmoe snapshot (not a zip archive)")
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise SnapshotError(f"{path} is not a readable zip archive: {e}") from None
    with z:
        infos, total = {}, 0
        for info in z.infolist():
            name = info.filename
            norm = posixpath.normpath(name)
            if (name.startswith(("/", "\\")) or "\\" in name or ":" in name or norm != name
                    or any(p in ("", ".", "..") for p in name.split("/"))):
                raise SnapshotError(f"member path {name!r} escapes the archive or is not plain; refusing the snapshot")
            if name not in ALLOWED or name in infos:
                raise SnapshotError(f"unexpected or repeated member {name!r}; a snapshot holds only {', '.join(ALLOWED)}")
            if info.file_size > MAX_MEMBER_BYTES:
                raise SnapshotError(f"member {name} declares {info.file_size} bytes, over the {MAX_MEMBER_BYTES} limit")
            if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > (1 << 20):
                raise SnapshotError(f"member {name} expands {info.file_size / max(info.compress_size, 1):.0f}x: "
                                    "refusing a likely zip bomb")
            total += info.file_size
            infos[name] = info
        if total > MAX_TOTAL_BYTES:
            raise SnapshotError(f"snapshot declares {total} bytes uncompressed, over the {MAX_TOTAL_BYTES} limit")
        if "manifest.json" not in infos:
            raise SnapshotError(f"{path} has no manifest.json: not a hetmoe snapshot")
        try:
            manifest = json.loads(_read(z, infos["manifest.json"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"manifest.json is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SnapshotError("manifest.json does not describe a hetmoe snapshot")
        if manifest.get("schema_version") not in range(1, SCHEMA_VERSION + 1):
            raise SnapshotError(f"snapshot schema version {manifest.get('schema_version')!r}; this hetmoe reads "
                                f"versions 1..{SCHEMA_VERSION}: export it again with a matching hetmoe")
        expected = tables_of(manifest["schema_version"])
        described = manifest.get("tables")
        if not isinstance(described, dict) or set(described) != set(expected):
            raise SnapshotError(f"manifest must describe exactly the tables {', '.join(expected)}")
        tables = {}
        for t in expected:
            d = described[t]
            name = f"{t}.parquet"
            if not isinstance(d, dict) or d.get("file") != name or name not in infos:
                raise SnapshotError(f"table {t}: member {name} missing or misnamed")
            blob = _read(z, infos[name])
            if hashlib.sha256(blob).hexdigest() != d.get("sha256"):
                raise SnapshotError(f"table {t}: sha256 checksum mismatch (the file was altered or damaged)")
            try:
                tables[t] = _read_parquet(blob)
            except Exception as e:   # pyarrow raises several types for a damaged file
                raise SnapshotError(f"table {t}: unreadable Parquet ({e})") from None
            if tables[t].num_rows != d.get("rows"):
                raise SnapshotError(f"table {t}: {tables[t].num_rows} rows, manifest says {d.get('rows')}")
        extra = set(infos) - {"manifest.json"} - {f"{t}.parquet" for t in expected}
        if extra:
            raise SnapshotError(f"unexpected members {sorted(extra)}")
    runs = set(tables["runs"].column("key").to_pylist()) if "key" in tables["runs"].column_names else set()
    if "key" in tables["metrics"].column_names and not set(tables["metrics"].column("key").to_pylist()) <= runs:
        raise SnapshotError("metrics refer to runs the snapshot does not hold")
    _check_metrics(tables["metrics"])
    if "model_shapes" in tables:
        _check_shapes(tables["model_shapes"])
    return manifest, tables


def _check_shapes(shapes) -> None:
    """Refuse a snapshot whose stored model shapes do not read as ``energy.ModelShapes`` (energy costs use them)."""
    from .energy import ModelShapes
    if "shapes" not in shapes.column_names:
        return   # the column check of import_snapshot reports it
    fps = shapes.column("model_fingerprint").to_pylist() if "model_fingerprint" in shapes.column_names \
        else [None] * shapes.num_rows
    for fp, js in zip(fps, shapes.column("shapes").to_pylist()):
        try:
            ModelShapes.from_dict(json.loads(js))
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"model shapes of {str(fp)[:40]}: {e}; refusing the snapshot (nothing was "
                                "imported)") from None


def _check_metrics(metrics) -> None:
    """Refuse a snapshot holding an impossible metric value (e.g. acc = 1234): it would be served as cached."""
    cols = metrics.column_names
    if not {"metric", "value"} <= set(cols):
        return   # the column check of import_snapshot reports it
    n = metrics.num_rows
    keys = metrics.column("key").to_pylist() if "key" in cols else [None] * n
    errs = metrics.column("stderr").to_pylist() if "stderr" in cols else [None] * n
    for key, metric, value, se in zip(keys, metrics.column("metric").to_pylist(), metrics.column("value").to_pylist(),
                                      errs):
        if why := metric_problem(metric, value, se):
            raise SnapshotError(f"run {str(key)[:12]}: {why}; refusing the snapshot (nothing was imported)")


def _with_provenance(t: str, table, origin: str):
    """The snapshot's runs with their origin set to this import; schema-1 tables get the schema-2 columns."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if t != "runs":
        return table
    for col in V2_COLUMNS:
        if col not in table.column_names:
            if col == "dtype" and "config" in table.column_names:
                vals = [json.loads(c).get("model", {}).get("dtype") if c else None
                        for c in table.column("config").to_pylist()]
            else:
                vals = [None] * table.num_rows
            table = table.append_column(col, pa.array(vals, pa.string()))
    i = table.column_names.index("origin")
    return table.set_column(i, "origin", pc.cast(pa.array([origin] * table.num_rows), pa.string()))


def _with_measurements(stats, measured: list) -> "pa.Table":
    """The expert_stats table plus each measured sensitivity (rows of the store's ``sensitivity`` table) as a
    validation entry with its store key (``examples.validation_record``), so a snapshot carries the measurements
    and ``import_snapshot`` restores them; an entry of the same name is replaced."""
    import pyarrow as pa
    from .examples import validation_record
    if not measured:
        return stats
    rows = {}
    for fp, key, config, result, created in measured:
        name, kept = validation_record(json.loads(result), key, json.loads(config))
        rows[(fp, name)] = {"model_fingerprint": fp, "name": name, "stats": canonical_json(kept),
                            "created_at": created}
    old = [r for r in stats.to_pylist() if (r["model_fingerprint"], r["name"]) not in rows]
    out = sorted(old + list(rows.values()), key=lambda r: (r["model_fingerprint"], r["name"]))
    return pa.Table.from_pylist(out, schema=stats.schema)


def import_snapshot(path: str | os.PathLike, store: Store) -> dict:
    """Merge a snapshot into ``store`` in one transaction (idempotent); returns rows added per table.

    Raises SnapshotError (see read_snapshot) or when a table's columns do not match the store's; the store is
    untouched on any error. A failed run in the store is replaced by the snapshot's successful one.
    """
    import duckdb
    manifest, tables = read_snapshot(path)
    origin = f"imported from {Path(path).name} (exported {manifest.get('created_at', 'at an unknown time')})"
    tables = {t: _with_provenance(t, tab, origin) for t, tab in tables.items()}
    added, unfit = {}, None
    try:
        with store.write_transaction() as con:
            for t in tables:   # TABLES order; a snapshot of schema 1 or 2 holds no model_shapes
                cols = [r[0] for r in con.execute(f"DESCRIBE {t}").fetchall()]
                later = set(ADDED_COLUMNS.get(t, ()))   # a snapshot from before they existed lacks them: NULL
                if sorted(tables[t].column_names) != sorted(cols) and \
                        sorted(set(tables[t].column_names) | later) != sorted(cols):
                    raise SnapshotError(f"table {t} has columns {tables[t].column_names}, the store has {cols}")
                con.register("incoming", tables[t])   # released by unregister, or on error by closing
                before = con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                if t == "runs":
                    con.execute("DELETE FROM runs WHERE status <> 'ok' AND key IN "
                                "(SELECT key FROM incoming WHERE status = 'ok')")
                    con.execute("DELETE FROM metrics WHERE key IN (SELECT key FROM incoming WHERE status = 'ok') "
                                "AND key NOT IN (SELECT key FROM runs)")
                con.execute(f"INSERT OR IGNORE INTO {t} BY NAME SELECT * FROM incoming")
                con.unregister("incoming")
                added[t] = con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] - before
    except duckdb.Error as e:   # raised outside the handler: the DuckDB error and its frames are not kept alive
        unfit = f"snapshot rows do not fit the store: {e}"
    if unfit:
        raise SnapshotError(unfit)
    from .examples import restore_measurements
    restored = restore_measurements(store)   # measured sensitivities travel as expert statistics
    if restored:
        added["sensitivity"] = restored
    return {"added": added, "snapshot_rows": {t: manifest["tables"][t]["rows"] for t in tables}}
