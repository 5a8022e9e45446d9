"""Example results shipped with hetmoe: a snapshot of the default model's noisy evaluations and measured
sensitivity, written by ``scripts/example_results.py`` (never edited by hand), that a fresh install loads into its
store so the Results and Validate pages show curves at once.

Measured sensitivities (``sensitivity.validate``) travel in the snapshot as expert statistics named
``validation:<preset>:s<seeds>:t<tokens>:<calibration hash[:12]>`` (the snapshot format carries the expert_stats
table), so the Validate page can show them without recomputing. In a snapshot each also carries the key and full
config of its row in the store's ``sensitivity`` table (``store_key``, ``store_config``); importing the snapshot puts
that row back, so the same ``validate`` request, and the ``oracle`` strategy that asks it, answer from the store.
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


def validation_record(validation: dict, key: str | None = None, config: dict | None = None) -> tuple[str, dict]:
    """(expert-statistics name, kept dict) of a Validation.to_dict(): the result, a shipped calibration file named
    relative to the install, and the store key and full config of its ``sensitivity`` row when known."""
    c = validation.get("calibration") or {}
    name = validation_name(validation["preset"], validation["seeds"], validation["tokens"], c.get("hash", ""))
    kept = {k: v for k, v in validation.items() if k not in ("cached", "store_key", "store_config")}
    if c.get("source") and Path(str(c["source"])).is_absolute():   # a shipped text: no machine's path in a snapshot
        from .routing import shipped_name
        kept["calibration"] = {**c, "source": shipped_name(c["source"])}
    if key:
        kept.update(store_key=key, store_config=config)
    return name, kept


def put_validation(store, validation: dict) -> str:
    """Keep a Validation.to_dict() as expert statistics of its model (the Validate page lists them); returns the
    name used. A snapshot adds the store key of each measurement itself (``snapshot.export_snapshot``)."""
    name, kept = validation_record(validation)
    store.put_expert_stats(validation["model_fingerprint"], name, kept)
    return name


def restore_measurements(store) -> int:
    """Put every validation kept as expert statistics with its store key back into the ``sensitivity`` table
    (append-only), so ``validate`` and the ``oracle`` strategy answer those requests from the store. Returns the
    rows added."""
    restored = 0
    for v in stored_validations(store).values():
        if v.get("store_key") and v.get("store_config"):
            result = {k: x for k, x in v.items() if k not in ("store_key", "store_config")}
            restored += store.put_sensitivity(v["store_key"], v["model_fingerprint"], v["preset"],
                                              v["store_config"], result)
    return restored


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
    transaction; the measured sensitivities it carries go back into the ``sensitivity`` table, so ``validate``
    and the ``oracle`` strategy answer those requests from the store). Returns the import's counts, with
    ``added["sensitivity"]`` the measurements restored (absent when none). Raises ValueError if the snapshot is missing (a broken install:
    reinstall, or run scripts/example_results.py) or invalid."""
    from .snapshot import import_snapshot
    if not Path(path).is_file():
        raise ValueError(f"no example results at {path}; reinstall hetmoe or run scripts/example_results.py")
    return import_snapshot(path, store)   # also restores the measurements it carries (restore_measurements)
