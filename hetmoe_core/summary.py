"""Summaries of stored results: mean ± std over seeds of results whose configuration is identical but for the seed.

Seeds are grouped by a hash of the stored config without its seed (``config_id``), never by a few columns, so
results that differ in batch size, dtype, few-shot, dense policy or any noise parameter never average together; an
edited preset is labelled with the fields that differ from it (``paper-pcm-c1.5 (adc_bits=4)``).
"""
from __future__ import annotations

import json

from .store import config_key

SUMMARY_KEYS = ("model_fingerprint", "task", "metric", "config_id")


def _without_seed(config: dict) -> dict:
    cfg = {k: v for k, v in config.items() if k != "seed"}
    if isinstance(cfg.get("placement"), dict):
        cfg["placement"] = {k: v for k, v in cfg["placement"].items() if k != "seed"}
    return cfg


def _preset_label(name, noise: dict | None) -> tuple[str, str]:
    """(label, overrides) of a stored noise config: the preset name plus the fields differing from the preset."""
    from .noise import PRESETS
    if not noise or name not in PRESETS:
        return str(name), ""
    ref = PRESETS[name].to_dict()
    diff = ", ".join(f"{k}={noise[k]!r}" if isinstance(noise[k], str) else f"{k}={noise[k]:g}"
                     if isinstance(noise[k], float) else f"{k}={noise[k]}"
                     for k in sorted(noise) if k != "name" and k in ref and noise[k] != ref[k])
    return (f"{name} ({diff})" if diff else str(name)), diff


def _deterministic(config: dict) -> bool:
    if config.get("kind") == "ideal":
        return True
    noise = config.get("noise")
    if not isinstance(noise, dict):
        return False
    from .noise import NoiseConfig
    try:
        return NoiseConfig(**noise).deterministic
    except (TypeError, ValueError):
        return False


def _direction(g):
    """lm-eval's higher_is_better of a group's metric: None when not stored (results from before it was)."""
    known = g["higher_is_better"].dropna() if "higher_is_better" in g else []
    return None if len(known) == 0 else bool(known.astype(bool).all())


def label_runs(runs):
    """``runs`` (a runs_frame, one row per run and metric) with the columns the summary groups and labels by:
    preset (the label, e.g. ``paper-pcm-c1.5 (adc_bits=6, t_inference=3600)`` for an edited preset: the name as
    the Results page's filters and table show it), preset_name (the stored name), overrides, config_id (12 hex
    digits of the config minus the seed), deterministic, analog_dense and dtype. Frames that filter or group runs
    alongside summary rows (``energy.run_costs``) label them here, so an edited preset matches its summary row."""
    import pandas as pd
    if runs.empty:
        return runs.assign(preset_name=runs.get("preset"), overrides="", config_id="", deterministic=False,
                           analog_dense="")
    info = {}
    for key, cfg_text, row in zip(runs.key, runs.config, runs.to_dict("records")):
        if key in info:
            continue
        try:
            cfg = json.loads(cfg_text) if isinstance(cfg_text, str) else None
        except json.JSONDecodeError:
            cfg = None
        if not isinstance(cfg, dict):   # a row without its config (hand-made): its columns are its config
            cfg = {c: row.get(c) for c in ("model_fingerprint", "strategy", "budget", "scope", "preset", "backend",
                                           "task", "task_version", "limit", "num_fewshot", "batch_size", "dtype")}
            cfg = {k: (None if v != v else v) if isinstance(v, float) else v for k, v in cfg.items()}
        label, overrides = _preset_label(row.get("preset"), cfg.get("noise"))
        dense = (cfg.get("placement") or {}).get("dense") or {}
        info[key] = {"config_id": config_key(_without_seed(cfg))[:12], "preset": label, "overrides": overrides,
                     "preset_name": row.get("preset"), "deterministic": _deterministic(cfg),
                     "analog_dense": ",".join(k for k, v in sorted(dense.items()) if v is False),
                     "dtype": row.get("dtype") or (cfg.get("model") or {}).get("dtype")}
    extra = pd.DataFrame.from_dict(info, orient="index")
    return runs.drop(columns=[c for c in extra.columns if c in runs]).join(extra, on="key")


def summarize_runs(runs):
    """Summary rows (see Store.summary_frame) of a runs_frame: seeds grouped by the config minus the seed."""
    import pandas as pd
    cols = ["model_source", "model_fingerprint", "strategy", "budget", "scope", "preset", "preset_name",
            "overrides", "dtype", "batch_size", "num_fewshot", "analog_dense", "backend", "task", "limit", "metric",
            "mean", "std", "n_seeds", "deterministic", "digital_share", "seeds", "origins", "shared", "config_id", "higher_is_better"]
    runs = runs[runs["metric"].notna() & (runs["status"] == "ok")] if len(runs) else runs
    if runs.empty:
        return pd.DataFrame(columns=cols)
    df = label_runs(runs)
    out = []
    for _, g in df.groupby(list(SUMMARY_KEYS), sort=False, dropna=False):
        first = g.iloc[0]
        vals = g["value"].astype(float)
        origins = g["origin"].fillna("computed") if "origin" in g else pd.Series(["computed"] * len(g))
        out.append({**{c: first[c] for c in cols if c in first.index},
                    "model_source": ", ".join(sorted({str(x) for x in g.model_source.dropna()})) or None,
                    "mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(g) > 1 else float("nan"),
                    "n_seeds": len(g), "digital_share": float(g.digital_share.astype(float).mean()),
                    "seeds": sorted(int(x) for x in g.seed.dropna()),
                    "origins": "; ".join(sorted(set(origins))),
                    "shared": int(g["shared_from"].notna().sum()) if "shared_from" in g else 0,
                    "higher_is_better": _direction(g)})
    res = pd.DataFrame(out, columns=cols)
    return res.sort_values(["task", "metric", "strategy", "budget", "preset"], kind="stable").reset_index(drop=True)
