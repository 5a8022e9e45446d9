"""The stored record of a sensitivity validation and its store key, without torch.

``sensitivity.validate`` measures; this module holds what a cache hit needs — the request's key (model
fingerprint, full noise config, calibration hash, tokens, seeds, bootstrap size, library versions) and the
``Validation`` record the store returns — so ``python -m hetmoe_core validate`` answers a stored request without
importing torch, transformers, aihwkit or lm-eval (same pattern as ``fingerprints`` for cache-hit ``evaluate``).
Field meanings and units: ``sensitivity`` module docstring (API contract).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .noise import NoiseConfig, get_preset

SEQ_LEN = 256            # tokens per calibration sequence (capped by the model's context)
_VERSION = 1             # bump when a measurement changes meaning (enters the store key)


def _check_noise(noise) -> NoiseConfig:
    if isinstance(noise, str):
        return get_preset(noise)
    if not isinstance(noise, NoiseConfig):
        raise ValueError(f"noise must be a preset name or a NoiseConfig, got {type(noise).__name__}")
    return noise


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (number of noise seeds), got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or any(s < 0 for s in out):
        raise ValueError(f"seeds must be a count >= 1 or a list of seeds >= 0, got {seeds!r}")
    return out


def _se(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def seeds_text(n: int) -> str:
    """'1 seed', '5 seeds'."""
    return f"{n} seed{'' if n == 1 else 's'}"


def spread_text(se: float | None, n_seeds: int) -> str:
    """A damage's standard error over the noise seeds as the Validate page states it: '± 0.002 over 5 seeds'; with
    one seed the seed spread is unknown: '± n/a with 1 seed' (results.NA, as the paired tables write it)."""
    from .results import NA
    if n_seeds < 2 or se is None or se != se:
        return f"± {NA} with {seeds_text(n_seeds)}"
    return f"± {se:.2g} over {seeds_text(n_seeds)}"


def signed(x: float | None, unit: str = "nats") -> str:
    """A signed difference as the cards show it: '+0.0123 nats', '-3.2e-08 nats' (scientific below 1e-3 in
    magnitude, so a tiny value never reads as '+-0.0000'), '0 nats' for exactly zero, '—' for None/NaN."""
    if x is None or x != x:
        return "—"
    if x == 0:
        return f"0 {unit}"
    return f"{x:+.4f} {unit}" if abs(x) >= 1e-3 else f"{x:+.1e} {unit}"


def calibration_source(v: dict) -> str:
    """What a validation (``Validation.to_dict()``) measured on, for people: the calibration's source as stored
    (the default model's validation split, a file, "texts given by the caller"); results stored before the source
    was named carry "given" or nothing and read "calibration text"."""
    source = (v.get("calibration") or {}).get("source")
    return "calibration text" if source in (None, "", "given") else source


def correlation_table(correlations: list[dict], scope: str):
    """The Validate page's table of one scope ("pooled" or a layer): a pandas DataFrame with the criterion's label
    (``strategies.criterion_labels``, as the charts name it), then Spearman's rho and Kendall's tau each with its
    95% bootstrap interval, then n (experts x seeds pooled), best first. ``correlations``: the ``correlations``
    rows of ``Validation.to_dict()``."""
    import pandas as pd
    from .strategies import criterion_labels
    labels = criterion_labels()
    t = pd.DataFrame([r for r in correlations if str(r.get("scope")) == str(scope)])
    if t.empty:
        return t
    t = t.assign(criterion=t["criterion"].map(lambda c: labels.get(c, c))).sort_values("spearman", ascending=False)
    cols = [c for c in ("criterion", "spearman", "spearman_lo", "spearman_hi", "kendall", "kendall_lo", "kendall_hi",
                        "n") if c in t]
    return t[cols].reset_index(drop=True)


def damage_resolved(v: dict) -> bool:
    """Whether a validation's all-routed-experts-analog damage (``Validation.to_dict()``) is resolved from zero.

    Resolved: its 95% t interval over the noise seeds (``paired.t_half_width`` of the standard error
    ``all_experts.se``) excludes 0, and it exceeds one float32 unit in the last place of the clean mean NLL
    (clean_nll × 2⁻²³ nats) — below that the difference is rounding, not noise. Criteria ranked against an
    unresolved damage cannot be judged (their correlations rank rounding noise)."""
    d, se = v["all_experts"]["damage"], v["all_experts"].get("se")
    n = len(v["seeds"]) if isinstance(v.get("seeds"), (list, tuple)) else int(v.get("seeds") or 1)
    if d is None or d != d or abs(d) <= abs(v.get("clean_nll") or 0.0) * 2.0 ** -23:
        return False
    if not se or n < 2:
        return False
    from .paired import t_half_width
    return abs(d) > t_half_width(se, n)


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


@dataclass
class Validation:
    """Measured sensitivity of a model under a noise preset and how well each criterion ranks it.

    Field meanings and units: ``sensitivity`` module docstring (API contract). ``to_dict()`` is the JSON the CLI
    prints and the store keeps; ``cached`` says the result came from the store without any forward pass.
    """
    model_fingerprint: str
    preset: str
    noise: dict
    seeds: list
    tokens: int
    calibration: dict
    clean_nll: float
    experts: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    dense: list = field(default_factory=list)
    all_experts: dict = field(default_factory=dict)
    correlations: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    routing_drift: list = field(default_factory=list)
    cached: bool = False

    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def only_this(self) -> list[np.ndarray]:
        """Mean only-this damage per MoE layer: float64 ``[E]`` each (nats per token)."""
        L = 1 + max(r["layer"] for r in self.experts)
        out = [[] for _ in range(L)]
        for r in sorted(self.experts, key=lambda r: (r["layer"], r["expert"])):
            out[r["layer"]].append(r["only_this"])
        return [np.asarray(v, dtype=np.float64) for v in out]

    def strategy_scores(self, strategy: str) -> list[np.ndarray] | None:
        """Per-layer float64 ``[E]`` scores of a measured placement strategy read from this record, as
        ``sensitivity.measured_scores`` would compute them for the same request (no forward pass): "oracle" is
        ``only_this()`` (nats per token); "local_error" is the Local Output Error that ``validate`` ranked
        (``criteria.criterion_scores``: the first ``LOCAL_ERROR_TOKENS`` of the same calibration stream and the same
        seeds as ``measured_scores``), None when this record holds none. Raises ValueError for another strategy."""
        if strategy == "oracle":
            return self.only_this()
        if strategy != "local_error":
            raise ValueError(f"strategy {strategy!r} is not measured; measured strategies are oracle, local_error")
        if not self.experts or any(r.get("score_local_error") is None for r in self.experts):
            return None
        L = 1 + max(r["layer"] for r in self.experts)
        out = [[] for _ in range(L)]
        for r in sorted(self.experts, key=lambda r: (r["layer"], r["expert"])):
            out[r["layer"]].append(r["score_local_error"])
        return [np.asarray(v, dtype=np.float64) for v in out]


def _texts(texts, source: str | None = None):
    """(texts by domain, where they came from) from None (``routing.default_calibration(source)``: the built-in
    sentences for ``tiny:`` models, else the shipped validation text), a file path or texts."""
    from pathlib import Path
    from .routing import _as_domains, default_calibration, read_calibration
    if texts is None:
        return default_calibration(source)
    if isinstance(texts, (str, Path)):
        return read_calibration(texts), str(texts)
    return _as_domains(texts), "texts given by the caller"


def request_key(fingerprint: str, noise: NoiseConfig, texts: dict, tokens: int, seeds: list, dtype: str,
                device: str, n_boot: int) -> tuple[str, dict]:
    """(store key, full config) of a validation request: model fingerprint and dtype, device type, full noise
    config, calibration hash, tokens, sequence length, seeds, bootstrap size and library versions."""
    from .evaluate import library_versions
    from .routing import calibration_hash
    from .store import config_key
    cfg = {"kind": "sensitivity", "v": _VERSION, "model": {"fingerprint": fingerprint, "dtype": dtype},
           "device": device.split(":")[0], "noise": noise.to_dict(),
           "calibration": calibration_hash(texts, SEQ_LEN), "tokens": tokens, "seq_len": SEQ_LEN,
           "seeds": list(seeds), "n_boot": n_boot, "versions": library_versions()}
    return config_key(cfg), cfg


def stored_validation(source: str, preset, *, seeds=5, texts=None, tokens: int = 16384, store=None,
                      n_boot: int = 1000, device: str = "cpu", dtype: str = "float32") -> Validation | None:
    """The stored ``Validation`` of a request (``sensitivity.validate``'s arguments, source given as a string),
    or None when it is not stored. Loads no model and imports no torch: the key comes from the request and the
    weights' file hash (``fingerprints.source_fingerprint``). Raises ValueError for bad input."""
    from .fingerprints import source_fingerprint
    from .store import Store
    noise, seeds = _check_noise(preset), _seeds(seeds)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    key, _ = request_key(source_fingerprint(source), noise, _texts(texts, source)[0], tokens, seeds, dtype, device, n_boot)
    st = store if isinstance(store, Store) else Store(store)
    hit = st.get_sensitivity(key)
    return None if hit is None else Validation(**{**hit, "cached": True})


def _size(v: dict) -> tuple:
    """Sort key of a stored measurement, largest first: seeds x tokens, then tokens."""
    n = len(v["seeds"]) if isinstance(v.get("seeds"), (list, tuple)) else int(v.get("seeds") or 1)
    return (-n * int(v.get("tokens") or 0), -int(v.get("tokens") or 0))


def stored_measurements(store, fingerprint: str, preset=None, *, dtype: str | None = None) -> list[dict]:
    """Every stored validation (``Validation.to_dict()``, ``cached`` True) of the model with weights
    ``fingerprint``, whatever seeds, tokens, calibration text or library versions it was asked with: the rows of
    the store's ``sensitivity`` table (what ``python -m hetmoe_core validate`` and the dashboard store) and the
    validations kept as expert statistics (``examples.put_validation``: the Validate page and the example results),
    one per (preset, seeds, tokens, calibration hash). ``preset`` (a name or NoiseConfig) keeps those measured
    under that noise (its name and, where stored, its full config); ``dtype`` keeps those measured in that dtype
    where the record says. Largest first (seeds x tokens, then tokens; the newest of equal size first). Reads the
    store only; an absent store holds nothing."""
    from .examples import stored_validations
    from .store import Store
    noise = None if preset is None else _check_noise(preset)
    try:
        st = store if isinstance(store, Store) else Store(store, create=False)
    except ValueError:     # no store yet: nothing is measured
        return []
    rows = st.query("SELECT config, result FROM sensitivity WHERE model_fingerprint = ? ORDER BY created_at",
                    [fingerprint])
    found = [(json.loads(r.config), json.loads(r.result)) for r in rows.itertuples()]
    found += [(v.get("store_config") or {}, {k: x for k, x in v.items() if k not in ("store_key", "store_config")})
              for v in stored_validations(st, fingerprint).values()]
    out: dict[tuple, dict] = {}
    for cfg, v in found:
        if noise is not None and (v.get("preset") != noise.name
                                  or (v.get("noise") and v["noise"] != noise.to_dict())):
            continue
        if dtype is not None and (cfg.get("model") or {}).get("dtype", dtype) != dtype:
            continue
        seeds = tuple(v["seeds"]) if isinstance(v.get("seeds"), (list, tuple)) else v.get("seeds")
        key = (v.get("preset"), seeds, v.get("tokens"), (v.get("calibration") or {}).get("hash"))
        out.pop(key, None)
        out[key] = {**v, "cached": True}          # the newest of a key last
    newest_first = list(out.values())[::-1]
    return sorted(newest_first, key=_size)       # stable: equal sizes stay newest first


TOKEN_CHOICES = (256, 1024, 4096, 16384, 65536)
"""Calibration token counts the Validate page offers for a new measurement (16,384 is validate's default)."""


def stored_requests(stored: list[dict], preset: str) -> list[tuple[int, int]]:
    """The (seeds, tokens) requests of ``stored`` (:func:`stored_measurements`' list) measured under ``preset``,
    once each, in its order (largest first): what the Validate page's "Stored under" menu lists."""
    from .examples import n_seeds
    return list(dict.fromkeys((n_seeds(d["seeds"]), int(d["tokens"])) for d in stored if d["preset"] == preset))


def token_choices(stored: list[dict], current: int | None = None) -> list[int]:
    """Token counts the Validate page offers, ascending: :data:`TOKEN_CHOICES`, every count stored for the model
    (``stored``), and the form's ``current`` one."""
    return sorted(set(TOKEN_CHOICES) | {int(d["tokens"]) for d in stored} | ({int(current)} if current else set()))


def shown_measurement(stored: list[dict], preset: str, seeds: int, tokens: int) -> tuple[dict | None, bool]:
    """(the stored measurement the Validate page shows for the request ``preset`` x ``seeds`` x ``tokens``,
    whether it is that request): the request when stored, else the preset's largest stored measurement, else None."""
    from .examples import n_seeds
    match = [d for d in stored if (d["preset"], n_seeds(d["seeds"]), d["tokens"]) == (preset, seeds, tokens)]
    same = [d for d in stored if d["preset"] == preset]
    return (match or same or [None])[0], bool(match)


def stored_strategy_scores(source: str, preset, *, store=None, dtype: str = "float32",
                           device: str = "cpu") -> tuple[Validation | None, dict[str, list[np.ndarray]]]:
    """(the stored measurement, {measured strategy: per-layer float64 ``[E]`` scores}) that the Placement page
    places oracle / local_error with under ``preset``, read from the store without a forward pass: the request
    ``sensitivity.measured_scores`` makes (``validate``'s defaults, 5 seeds x 16,384 tokens of the default
    calibration text) when it is stored, else the largest stored measurement of the model under ``preset``
    whatever its seeds and tokens (:func:`stored_measurements`; the returned Validation says which); (None, {})
    when none is stored, when ``preset`` is noise-free or when the store does not exist. Raises ValueError for an
    unknown preset."""
    from .fingerprints import source_fingerprint
    from .store import Store
    noise = _check_noise(preset)
    if noise.name == "ideal":
        return None, {}
    try:
        st = store if isinstance(store, Store) else Store(store, create=False)
    except ValueError:     # no store yet: nothing is measured
        return None, {}
    v = stored_validation(source, noise, store=st, dtype=dtype, device=device)
    if v is None:
        others = stored_measurements(st, source_fingerprint(source), noise, dtype=dtype)
        if not others:
            return None, {}
        v = Validation(**{k: x for k, x in others[0].items() if k in Validation.__dataclass_fields__})
    found = {s: v.strategy_scores(s) for s in ("oracle", "local_error")}
    return v, {s: x for s, x in found.items() if x is not None}


def measured_caption(preset: str, validation: Validation | None, scores: dict) -> str:
    """The line under the Placement page's strategy choice about the measured strategies (oracle, local_error), in
    Markdown: which of them place by the damage stored under ``preset`` (the Evaluate page's noise preset) and from
    how many seeds and tokens, or why none is offered: ``preset`` is noise-free, or no measurement of the model
    under it is stored (then where to make it, with the seeds and tokens of the request
    :func:`stored_strategy_scores` looks up). ``validation`` and ``scores`` are what
    :func:`stored_strategy_scores` returned for ``preset``."""
    from .placement import MEASURED_STRATEGIES
    from .strategies import label
    if scores:
        verb = "places" if len(scores) == 1 else "place"
        return (f"{' and '.join(label(n) for n in scores)} {verb} by the damage measured under **{preset}** "
                f"(the Evaluate page's noise preset; the stored measurement of {seeds_text(len(validation.seeds))} × "
                f"{validation.tokens:,} tokens of {calibration_source(validation.to_dict())}): read from the store, "
                "nothing is recomputed.")
    names = " and ".join(label(n) for n in MEASURED_STRATEGIES)
    if preset == "ideal":
        return f"{names} are not offered: the Evaluate page's noise preset is *ideal*, which damages nothing."
    asked = stored_validation.__kwdefaults__            # the request stored_strategy_scores looks up first
    return (f"{names} are not offered: no damage measurement of this model under **{preset}** (the Evaluate "
            f"page's noise preset) is stored. Measure it on the Validate page (any seeds and tokens; "
            f"{asked['seeds']} seeds × {asked['tokens']:,} tokens is what Evaluate's oracle measures).")
