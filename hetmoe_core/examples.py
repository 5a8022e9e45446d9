"""Example results shipped with hetmoe: a snapshot of the default model's noisy evaluations and measured
sensitivity, written by ``scripts/example_results.py`` (never edited by hand), that a fresh install loads into its
store so the Results and Validate pages show curves at once.

Measured sensitivities (``sensitivity.validate``) travel in the snapshot as expert statistics named
``validation:<preset>:s<seeds>:t<tokens>:<calibration hash[:12]>`` (the snapshot format carries the expert_stats
table), so the Validate page can show them without recomputing.
"""
from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples" / "default.zip"
PREFIX = "validation:"


def n_seeds(seeds) -> int:
    """A Validation's seeds (a list of seeds, or a count) as a count."""
    return len(seeds) if isinstance(seeds, (list, tuple)) else int(seeds)


def validation_name(preset: str, seeds, tokens: int, calibration_hash: str) -> str:
    """Expert-statistics name under which one validation result is kept (see module docstring)."""
    return f"{PREFIX}{preset}:s{n_seeds(seeds)}:t{int(tokens)}:{str(calibration_hash)[:12]}"


def put_validation(store, validation: dict) -> str:
    """Keep a Validation.to_dict() as expert statistics of its model; returns the name used."""
    c = validation.get("calibration") or {}
    name = validation_name(validation["preset"], validation["seeds"], validation["tokens"], c.get("hash", ""))
    store.put_expert_stats(validation["model_fingerprint"], name, validation)
    return name


def stored_validations(store, fingerprint: str | None = None) -> dict[str, dict]:
    """{name: Validation dict} of every validation kept in ``store`` (of one model if ``fingerprint``), newest last."""
    sql = "SELECT model_fingerprint, name, stats FROM expert_stats WHERE name LIKE ?"
    params = [PREFIX + "%"]
    if fingerprint:
        sql += " AND model_fingerprint = ?"
        params.append(fingerprint)
    df = store.query(sql + " ORDER BY created_at", params)
    return {r.name: json.loads(r.stats) for r in df.itertuples()}


def load_examples(store, path: str | Path = EXAMPLES) -> dict:
    """Merge the shipped example snapshot into ``store`` (snapshot.import_snapshot: validated, idempotent, one
    transaction). Returns its counts. Raises ValueError if the snapshot is missing (a broken install: reinstall, or
    run scripts/example_results.py) or invalid."""
    from .snapshot import import_snapshot
    if not Path(path).is_file():
        raise ValueError(f"no example results at {path}; reinstall hetmoe or run scripts/example_results.py")
    return import_snapshot(path, store)
